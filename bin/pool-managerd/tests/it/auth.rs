use crate::harness::*;

// covers: AUTH-5102, AUTH-5107
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_auth_guards_everything_but_health_and_token_never_reaches_logs() {
    let d = Daemon::start(DaemonOptions {
        pools_toml: pool_toml("authp", &tiny_model(), 1, 512),
        ..Default::default()
    })
    .await;
    d.wait_ready("authp").await;
    let anon = reqwest::Client::new();
    let url = format!("{}/v2/pools", d.base);

    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        (
            "wrong token",
            Some("Bearer wrong-token-000000000000".into()),
        ),
        ("malformed header", Some(format!("Token {TOKEN}"))),
        ("empty bearer", Some("Bearer ".into())),
    ];
    for (what, header) in cases {
        let mut rb = anon.get(&url).header(
            "x-correlation-id",
            format!("case-{}", what.replace(' ', "-")),
        );
        if let Some(h) = header {
            rb = rb.header("authorization", h);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        assert_eq!(
            r.headers()["x-correlation-id"],
            format!("case-{}", what.replace(' ', "-")).as_str()
        );
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["code"], "UNAUTHORIZED", "{what}");
        assert_eq!(body["retriable"], false);
        assert!(body["message"].as_str().unwrap().len() > 5);
    }
    for protected in ["/metrics", "/v2/pools/authp/status"] {
        let r = anon
            .get(format!("{}{protected}", d.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{protected}");
    }
    let r = anon
        .post(format!("{}/v2/pools/authp/engine/completion", d.base))
        .body(r#"{"prompt":"x","n_predict":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "engine proxy without token");

    // Right token → 200; /health open.
    assert_eq!(d.http.get(&url).send().await.unwrap().status(), 200);
    let ok = d
        .http
        .post(format!("{}/v2/pools/authp/engine/completion", d.base))
        .body(r#"{"prompt":"x","n_predict":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        anon.get(format!("{}/health", d.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // No log line — daemon or engine — carries the token.
    let mut logs = d.log();
    for entry in std::fs::read_dir(d.runtime_dir.join("logs")).unwrap() {
        logs.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    assert!(logs.contains("request refused"), "refusals are logged");
    assert!(
        logs.contains(&auth_min::fingerprint(TOKEN)),
        "startup logs the token fingerprint"
    );
    assert!(!logs.contains(TOKEN), "token leaked into logs");
    assert!(
        !logs.contains("wrong-token-000000000000"),
        "presented token leaked into logs"
    );
}
