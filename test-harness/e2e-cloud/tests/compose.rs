//! `docker-compose.cloud.yml` is valid compose (checked by `docker-compose config`, Debian's
//! package, installed by `make test`), has its three services with healthchecks, speaks HTTPS
//! everywhere, and sets only variables the daemons actually read (each one appears in the
//! daemon's `--help`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn compose(args: &[&str]) -> String {
    let out = std::process::Command::new("docker-compose")
        .current_dir(root())
        .args(["-f", "docker-compose.cloud.yml"])
        .args(args)
        .output()
        .expect("docker-compose not found: `make test` installs Debian's docker-compose");
    assert!(
        out.status.success(),
        "docker-compose {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn vars_with_prefix(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn compose_file_is_valid_and_uses_only_real_settings() {
    compose(&["config", "-q"]);
    let services: Vec<String> = compose(&["config", "--services"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        services,
        vec!["orchestratord", "pool-managerd-a", "pool-managerd-b"]
    );
    let resolved = compose(&["config"]);
    assert_eq!(
        resolved.matches("healthcheck:").count(),
        3,
        "every service has a healthcheck"
    );
    for secret in ["llorch_node_token", "llorch_admin_token", "llorch_api_keys"] {
        assert!(
            resolved.contains(&format!("/run/secrets/{secret}")),
            "credentials come from secret files: {secret}"
        );
    }
    for value in [
        "LLORCH_API_TOKEN:",
        "LLORCH_NODE_TOKEN:",
        "LLORCH_ADMIN_TOKEN:",
    ] {
        assert!(
            !resolved.contains(value),
            "no credential value in the compose file: {value}"
        );
    }
    // HTTPS everywhere, mutual TLS for the nodes; keys come from secret files.
    for setting in [
        "ORCHD_TLS_CERT_FILE: /run/secrets/orchestratord.crt",
        "ORCHD_TLS_KEY_FILE: /run/secrets/orchestratord.key",
        "ORCHD_TLS_CLIENT_CA_FILE: /run/secrets/ca.crt",
        "POOL_MANAGERD_TLS_KEY_FILE: /run/secrets/pool-managerd-a.key",
        "POOL_MANAGERD_TLS_KEY_FILE: /run/secrets/pool-managerd-b.key",
        "POOL_MANAGERD_ORCHESTRATORD_URL: https://orchestratord:8080",
    ] {
        assert!(resolved.contains(setting), "{setting} missing:\n{resolved}");
    }
    assert!(
        !resolved.contains("http://"),
        "a plain http:// URL:\n{resolved}"
    );
    // Only orchestratord's port is published.
    assert_eq!(resolved.matches("published:").count(), 1, "{resolved}");

    let target = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let help = |bin: &str| {
        let out = std::process::Command::new(target.join(bin))
            .arg("--help")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (orch, node) = (help("orchestratord"), help("pool-managerd"));
    for (bin, text, prefix) in [
        ("orchestratord", &orch, "ORCHD_"),
        ("pool-managerd", &node, "POOL_MANAGERD_"),
    ] {
        let known = vars_with_prefix(text, prefix);
        for var in vars_with_prefix(&resolved, prefix) {
            assert!(
                known.contains(&var),
                "{var} in the compose file is not a setting of {bin}"
            );
        }
    }
    // The shared LLORCH_* settings: each read by at least one daemon.
    let known = &vars_with_prefix(&orch, "LLORCH_") | &vars_with_prefix(&node, "LLORCH_");
    for var in vars_with_prefix(&resolved, "LLORCH_") {
        assert!(known.contains(&var), "{var} is read by neither daemon");
    }
}
