//! A real Prometheus (Debian's package) on loopback scrapes both live daemons — pool-managerd
//! with the Bearer token, orchestratord's open `/metrics` — with the alert rules loaded, and
//! answers queries for a series of each through its HTTP API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use llorch_test_support::*;
use tokio::process::Command;

const TOKEN: &str = "ops-scrape-token-5b1e0c7d9a";

fn spawn(
    bin: &std::path::Path,
    env: &[(&str, String)],
    log: &std::path::Path,
) -> tokio::process::Child {
    let file = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(bin);
    cmd.env("LLORCH_API_TOKEN", TOKEN)
        // Info from the daemons themselves: the line naming the address each bound.
        .env("RUST_LOG", "warn,orchestratord=info,pool_managerd=info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

async fn query(http: &reqwest::Client, prom: &str, q: &str) -> Vec<serde_json::Value> {
    let encoded: String = q
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let Ok(r) = http
        .get(format!("{prom}/api/v1/query?query={encoded}"))
        .send()
        .await
    else {
        return Vec::new();
    };
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

// covers: OBS-6102
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_both_live_daemons_with_the_rules_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("pools.toml"),
        format!(
            "[[pools]]\nid = \"p0\"\nmodel = \"{}\"\nmodel_id = \"tiny\"\nslots = 1\nctx = 1024\nargs = [\"--threads\", \"1\"]\n",
            tiny_model().display()
        ),
    )
    .unwrap();
    let pm_log = d.join("pool-managerd.log");
    let mut pm = spawn(
        &workspace_binary("pool-managerd"),
        &[
            ("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0".into()),
            (
                "POOL_MANAGERD_CONFIG",
                d.join("pools.toml").display().to_string(),
            ),
            (
                "POOL_MANAGERD_RUNTIME_DIR",
                d.join("run").display().to_string(),
            ),
            (
                "POOL_MANAGERD_ENGINE_BINARY",
                engine_binary().display().to_string(),
            ),
        ],
        &pm_log,
    );
    let orch_log = d.join("orchestratord.log");
    let mut orch = spawn(
        &workspace_binary("orchestratord"),
        &[
            ("ORCHD_BIND_ADDR", "127.0.0.1:0".into()),
            ("ORCHD_RUNTIME_DIR", d.join("run").display().to_string()),
            ("ORCHD_DATA_DIR", d.join("data").display().to_string()),
        ],
        &orch_log,
    );
    let wait = Duration::from_secs(30);
    let pm_addr = logged_addr(&mut pm, &pm_log, "pool-managerd listening", wait).await;
    let orch_addr = logged_addr(&mut orch, &orch_log, "orchestratord listening", wait).await;
    wait_http_ok(
        "orchestratord ready",
        &format!("http://{orch_addr}/ready"),
        Duration::from_secs(30),
    )
    .await;

    let token_file = d.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let rules = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../ci/alerts/cloud_profile.yml");
    std::fs::write(
        d.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: orchestratord\n    static_configs:\n      - targets: ['{orch_addr}']\n  - job_name: pool-managerd\n    authorization:\n      credentials_file: {token}\n    static_configs:\n      - targets: ['{pm_addr}']\n",
            rules = rules.display(),
            token = token_file.display()
        ),
    )
    .unwrap();
    let prom_log = d.join("prometheus.log");
    let file = std::fs::File::create(&prom_log).unwrap();
    let _prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            d.join("prometheus.yml").display()
        ))
        .arg(format!("--storage.tsdb.path={}", d.join("tsdb").display()))
        .arg("--web.listen-address=127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus not found: `make test` installs Debian's prometheus package");
    // Prometheus logs the port the kernel gave it: `msg="Listening on" address=HOST:PORT`.
    let prom_addr = wait_for("prometheus listening", wait, || async {
        let text = std::fs::read_to_string(&prom_log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("msg=\"Listening on\""))
            .find_map(|l| l.split_once("address=").map(|(_, a)| a.trim().to_string()))
    })
    .await;
    let prom = format!("http://{prom_addr}");
    let http = reqwest::Client::new();
    let series = wait_for("both daemons scraped", Duration::from_secs(30), || async {
        let pm = query(
            &http,
            &prom,
            r#"pool_ready{job="pool-managerd",pool_id="p0"}"#,
        )
        .await;
        let orch = query(
            &http,
            &prom,
            r#"orchd_pools_available{job="orchestratord",pool_id="p0"}"#,
        )
        .await;
        (!pm.is_empty() && !orch.is_empty()).then_some((pm, orch))
    })
    .await;
    assert_eq!(series.0[0]["value"][1], "1", "{:?}", series.0);
    assert_eq!(series.1[0]["value"][1], "1", "{:?}", series.1);
    let up = query(&http, &prom, "up").await;
    assert_eq!(up.len(), 2);
    assert!(up.iter().all(|u| u["value"][1] == "1"), "{up:?}");
    // The rules are loaded and evaluated against the live series: nothing fires while healthy.
    let rules: serde_json::Value = http
        .get(format!("{prom}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loaded: usize = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum();
    assert_eq!(loaded, 6);
    // Evaluated on live data, nothing is pending or firing while the pool is healthy (an
    // evaluation before the first scrape may leave PoolUnavailable pending for a moment).
    wait_for(
        "no alert pending or firing",
        Duration::from_secs(15),
        || async {
            let alerts: serde_json::Value = http
                .get(format!("{prom}/api/v1/alerts"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            alerts["data"]["alerts"]
                .as_array()?
                .is_empty()
                .then_some(())
        },
    )
    .await;
}
