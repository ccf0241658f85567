//! The operator console (`/ui`) in headless Chromium against the real stack: it asks for the
//! admin token once, says so when a token is refused, shows the pool, the tasks and their
//! rates, drains and reloads the pool by click (seen on the page and through the API), says
//! so when orchestratord is gone, and breaks none of its own Content-Security-Policy.

use std::time::{Duration, Instant};

use llorch_contracts::overview::Overview;

use crate::browser::Browser;
use crate::harness::*;

const WAIT: Duration = Duration::from_secs(20);

/// An expression: the state shown in pool `id`'s row (null while there is no row).
fn row_state(id: &str) -> String {
    format!(
        "(() => {{ const tr = document.querySelector('#pools tr[data-key=\"{id}\"]'); \
         return tr ? tr.dataset.state : null; }})()"
    )
}

/// An expression: whether the error line shows text containing `needle`.
fn error_says(needle: &str) -> String {
    format!(
        "(() => {{ const e = document.getElementById('error'); \
         return !e.hidden && e.textContent.includes('{needle}') ? e.textContent : null; }})()"
    )
}

const DIALOG_OPEN: &str = "document.getElementById('action-dialog').open";
const DIALOG_CLOSED: &str = "!document.getElementById('action-dialog').open";

async fn overview(s: &Stack) -> Overview {
    let r = s.get("/v2/overview").await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Where test artifacts go: `test-artifacts/` in the target directory.
fn artifact(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts")
        .join(name)
}

// covers: OBS-6111
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_console_shows_the_pool_and_tasks_and_drains_and_reloads_the_pool_by_click() {
    let started = Instant::now();
    // First: without Chromium the test fails at once, saying how to install it.
    let browser = Browser::launch().await;
    let mut s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 2, 1024),
        ..Default::default()
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(s.submit_ok(task(&format!("console {i}"), 16)).await.task_id);
    }
    // Token events per task (the engine may merge byte pieces: up to 16 each).
    let mut streamed = Vec::new();
    for id in &ids {
        streamed.push(s.wait_task(id, WAIT).await.tokens_out);
    }
    let total: u32 = streamed.iter().sum();
    assert!(total > 0);

    // The page is open (it holds no data), under a strict policy, and never cached.
    let r = reqwest::get(format!("{}/ui", s.base)).await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    let csp = h["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-store");
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));

    let page = browser.open(&format!("{}/ui", s.base)).await;
    page.wait_for(
        "the token prompt",
        WAIT,
        "!document.getElementById('login').hidden",
    )
    .await;

    // A wrong token is refused, and the page says so and asks again.
    page.type_into("#token-input", "not-the-admin-token-000000")
        .await;
    page.click_until("#token-submit", &error_says("refused"), WAIT)
        .await;
    let refusal = page.wait_for("the refusal", WAIT, &error_says("401")).await;
    assert!(
        refusal.as_str().unwrap().contains("UNAUTHORIZED"),
        "{refusal}"
    );
    assert_eq!(
        page.eval("document.getElementById('login').hidden").await,
        false
    );

    // The admin token: the pool, its slots and model, and the tasks show.
    page.type_into("#token-input", TOKEN).await;
    page.click_until(
        "#token-submit",
        "document.getElementById('login').hidden",
        WAIT,
    )
    .await;
    page.wait_for(
        "pool p0 ready on the page",
        WAIT,
        &format!("{} === 'ready'", row_state("p0")),
    )
    .await;
    assert_eq!(
        page.eval("document.getElementById('error').hidden").await,
        true
    );
    let cells = page
        .eval("Array.from(document.querySelector('#pools tr[data-key=\"p0\"]').cells).map((c) => c.textContent)")
        .await;
    assert_eq!(cells[2], "tiny", "{cells}");
    assert_eq!(cells[4], "0 / 2", "{cells}");
    for (id, tokens) in ids.iter().zip(&streamed) {
        let row = page
            .wait_for(
                &format!("task {id} on the page"),
                WAIT,
                &format!(
                    "(() => {{ const tr = document.querySelector('#tasks tr[data-key=\"{id}\"]'); \
                     return tr ? Array.from(tr.cells).map((c) => c.textContent) : null; }})()"
                ),
            )
            .await;
        assert_eq!(row[1], "completed", "{row}");
        assert_eq!(row[3], "p0", "{row}");
        assert_eq!(row[9], tokens.to_string(), "{row}");
    }
    // The rates of the last minutes: those tokens, and a first-token median.
    page.wait_for(
        &format!("{total} tokens in the last minutes"),
        WAIT,
        &format!("document.getElementById('tokens-total').textContent === '{total}'"),
    )
    .await;
    let first = page
        .eval("document.getElementById('first-token-now').textContent")
        .await;
    assert!(first.as_str().unwrap().ends_with(" ms"), "{first}");
    assert!(
        page.eval("document.querySelectorAll('#chart-tps rect.bar').length")
            .await
            .as_u64()
            > Some(0)
    );

    // The token lives in this tab's session storage, nowhere else; a reload asks for nothing.
    let stored = page
        .eval("[sessionStorage.getItem('llorch.adminToken'), localStorage.length, document.cookie]")
        .await;
    assert_eq!(stored, serde_json::json!([TOKEN, 0, ""]));
    page.reload().await;
    page.wait_for(
        "pool p0 after a reload",
        WAIT,
        &format!("{} === 'ready'", row_state("p0")),
    )
    .await;
    assert_eq!(
        page.eval("document.getElementById('login').hidden").await,
        true
    );

    // Drain by click: the pool stops, on the page and in the API.
    page.click_until(
        "#pools button[data-action='drain'][data-pool='p0']",
        DIALOG_OPEN,
        WAIT,
    )
    .await;
    page.type_into("#action-value", "1000").await;
    page.click_until("#action-confirm", DIALOG_CLOSED, WAIT)
        .await;
    page.wait_for(
        "the drain accepted",
        WAIT,
        "document.getElementById('notice').textContent.includes('Drain of pool p0 accepted')",
    )
    .await;
    page.wait_for(
        "pool p0 stopped on the page",
        WAIT,
        &format!("{} === 'stopped'", row_state("p0")),
    )
    .await;
    // orchestratord unbinds the pool (its handoff file went at the drain's start) and keeps
    // showing it as its node reports it.
    wait_for(
        "pool p0 stopped and unbound in the overview",
        WAIT,
        || async {
            let o = overview(&s).await;
            let p0 = o.pools.into_iter().find(|p| p.pool_id == "p0")?;
            (p0.state == "stopped" && !p0.placeable && p0.listed.is_none()).then_some(())
        },
    )
    .await;
    let at_node: serde_json::Value = s
        .http
        .get(format!("{}/v2/pools/p0/status", s.pm_base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(at_node["state"], "stopped");
    assert_eq!(
        s.get("/v2/pools")
            .await
            .json::<serde_json::Value>()
            .await
            .unwrap()["pools"],
        serde_json::json!([])
    );
    page.screenshot(&artifact("console-drained.png")).await;

    // Reload by click, with the model's path: the pool serves again.
    page.click_until(
        "#pools button[data-action='reload'][data-pool='p0']",
        DIALOG_OPEN,
        WAIT,
    )
    .await;
    page.type_into("#action-value", &tiny_model().display().to_string())
        .await;
    page.click_until("#action-confirm", DIALOG_CLOSED, WAIT)
        .await;
    page.wait_for(
        "pool p0 ready again on the page",
        WAIT,
        &format!("{} === 'ready'", row_state("p0")),
    )
    .await;
    page.wait_for(
        "the reload accepted",
        WAIT,
        "document.getElementById('notice').textContent.includes('Reload of pool p0 accepted')",
    )
    .await;
    s.wait_pools_ready(1).await;
    let o = overview(&s).await;
    let p0 = o.pools.iter().find(|p| p.pool_id == "p0").unwrap();
    assert!(p0.placeable && p0.listed.is_some(), "{p0:?}");

    let shot = artifact("console.png");
    page.screenshot(&shot).await;
    println!("console screenshot: {}", shot.display());

    // orchestratord gone: the page says it is unreachable.
    s.orch.start_kill().unwrap();
    s.orch.wait().await.unwrap();
    page.wait_for("the unreachable line", WAIT, &error_says("unreachable"))
        .await;

    let violations = page.eval("window.__cspViolations").await;
    assert_eq!(
        violations,
        serde_json::json!([]),
        "the page broke its own policy"
    );
    assert_eq!(browser.exceptions(), Vec::<serde_json::Value>::new());
    browser.close().await;
    println!("console test took {:.1} s", started.elapsed().as_secs_f64());
}
