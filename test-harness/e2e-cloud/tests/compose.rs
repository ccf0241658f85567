//! `docker-compose.cloud.yml` is valid compose (checked by `docker-compose config`, Debian's
//! package, installed by `make test`), has its three services with healthchecks, speaks HTTPS
//! everywhere, keeps orchestratord's admission journal on a named volume, and sets only
//! variables the daemons actually read (each one appears in the daemon's `--help`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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

/// One service's block of the resolved file: the lines under its name, up to the next service.
fn service<'a>(resolved: &'a str, name: &str) -> &'a str {
    let header = format!("\n  {name}:\n");
    let start = resolved.find(&header).expect("no such service") + header.len();
    let block = &resolved[start..];
    let end = block
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .find(|&i| !block[i..].starts_with("    "))
        .unwrap_or(block.len());
    &block[..end]
}

/// The value of `key: value` in a block (the first one).
fn value<'a>(block: &'a str, key: &str) -> Option<&'a str> {
    block.lines().find_map(|line| {
        line.trim_start()
            .strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(": "))
            .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\''))
    })
}

/// The named volume mounted at `target` in a service block: compose v1 prints
/// `- source:target:rw`, v2 a `type: volume` entry with `source:` and `target:`.
fn named_volume_at<'a>(block: &'a str, target: &str) -> Option<&'a str> {
    let short = block.lines().find_map(|line| {
        let spec = line.trim_start().strip_prefix("- ")?;
        let mut parts = spec.split(':');
        let (source, at) = (parts.next()?, parts.next()?);
        (at == target).then_some(source)
    });
    short
        .or_else(|| {
            let i = block.find(&format!("target: {target}\n"))?;
            let entry = &block[block[..i].rfind("- type:")?..i];
            entry
                .contains("type: volume")
                .then(|| value(entry, "source"))
                .flatten()
        })
        .filter(|source| !source.starts_with(['/', '.', '~']))
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

    // orchestratord's admission journal outlives its container: ORCHD_DATA_DIR is on a named
    // volume the file declares (not a bind mount, not the handoff directory), and a crash
    // restarts the container, which replays the journal.
    let orch_service = service(&resolved, "orchestratord");
    let data_dir = value(orch_service, "ORCHD_DATA_DIR")
        .unwrap_or_else(|| panic!("orchestratord has no ORCHD_DATA_DIR:\n{orch_service}"));
    assert!(
        data_dir.starts_with('/'),
        "ORCHD_DATA_DIR {data_dir} is not absolute"
    );
    let volume = named_volume_at(orch_service, data_dir)
        .unwrap_or_else(|| panic!("no named volume at ORCHD_DATA_DIR {data_dir}:\n{orch_service}"));
    let declared = &resolved[resolved
        .rfind("\nvolumes:\n")
        .expect("no top-level volumes:")..];
    assert!(
        declared.contains(&format!("\n  {volume}:")),
        "the volume {volume} is not declared at the top level:\n{declared}"
    );
    assert!(
        matches!(
            value(orch_service, "restart"),
            Some("always" | "unless-stopped")
        ),
        "orchestratord is not restarted after a crash:\n{orch_service}"
    );
    for node in ["pool-managerd-a", "pool-managerd-b"] {
        let node_service = service(&resolved, node);
        let runtime = value(node_service, "POOL_MANAGERD_RUNTIME_DIR").expect("runtime dir");
        let other = named_volume_at(node_service, runtime).expect("runtime volume");
        assert_ne!(
            other, volume,
            "{node} shares orchestratord's journal volume"
        );
        let (data, runtime_path) = (Path::new(data_dir), Path::new(runtime));
        assert!(
            !(data.starts_with(runtime_path) || runtime_path.starts_with(data)),
            "ORCHD_DATA_DIR {data_dir} overlaps {node}'s handoff directory {runtime}"
        );
    }

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
