//! Behaviour scenarios over the real daemons (`features/*.feature`), run by cucumber.
//!
//! One scenario runs at a time (the daemons of a feature are shared between its scenarios, and
//! a 2-core machine runs engines, daemons and the suite together). The run fails on a failed,
//! undefined or skipped step, on a hook error, and, when every scenario ran, on a step
//! definition no scenario used.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod daemons;
mod steps;
mod used_steps;
mod world;

use cucumber::writer::Stats as _;
use cucumber::{World as _, WriterExt as _};
use futures_util::FutureExt as _;

use world::Bdd;

/// libtest options that `cargo test -- …` hands every test binary (`make test` passes
/// `--test-threads`); cucumber's own command line does not know them.
const LIBTEST_FLAGS: &[&str] = &[
    "--nocapture",
    "--show-output",
    "--quiet",
    "-q",
    "--include-ignored",
    "--ignored",
    "--exact",
];
const LIBTEST_OPTIONS: &[&str] = &["--test-threads"];

fn cucumber_args() -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args();
    out.extend(args.next());
    while let Some(a) = args.next() {
        if LIBTEST_FLAGS.contains(&a.as_str())
            || LIBTEST_OPTIONS
                .iter()
                .any(|o| a.starts_with(&format!("{o}=")))
        {
            continue;
        }
        if LIBTEST_OPTIONS.contains(&a.as_str()) {
            args.next();
            continue;
        }
        out.push(a);
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = cucumber_args();
    // A run narrowed by name, tags or input path leaves steps unused by design.
    let filtered = args.iter().skip(1).any(|a| {
        [
            "-n",
            "--name",
            "--scenario-name",
            "-t",
            "--tags",
            "-i",
            "--input",
        ]
        .iter()
        .any(|f| a == f || a.starts_with(&format!("{f}=")))
    }) || std::env::var_os("CUCUMBER_FILTER_TAGS").is_some();
    let features = concat!(env!("CARGO_MANIFEST_DIR"), "/features");

    let (writer, used) = used_steps::RecordUsed::new(
        cucumber::writer::Basic::stdout()
            .summarized()
            .fail_on_skipped(),
    );
    let cli = <cucumber::cli::Opts<_, _, _> as cucumber::cli::Parser>::parse_from(args);
    let result = Bdd::cucumber()
        .max_concurrent_scenarios(1)
        .after(|_feature, _rule, _scenario, finished, world| {
            let failed = !matches!(finished, cucumber::event::ScenarioFinished::StepPassed);
            async move {
                if let Some(w) = world {
                    w.clean_up(failed).await;
                }
            }
            .boxed_local()
        })
        .with_writer(writer)
        .with_cli(cli)
        .run(features)
        .await;
    daemons::stop_all().await;

    let mut problems = Vec::new();
    if result.execution_has_failed() {
        problems.push(format!(
            "{} failed or skipped step(s), {} parsing error(s), {} hook error(s)",
            result.failed_steps(),
            result.parsing_errors(),
            result.hook_errors()
        ));
    }
    if result.passed_steps() == 0 && !filtered {
        problems.push("no step ran".to_string());
    }
    if filtered {
        println!("(a filtered run: the check for unused step definitions is left out)");
    } else {
        let used = used
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let unused: Vec<String> = used_steps::defined::<Bdd>()
            .difference(&used)
            .map(|(kw, loc)| format!("  {kw} step defined at {loc}"))
            .collect();
        if !unused.is_empty() {
            problems.push(format!(
                "{} step definition(s) no scenario used:\n{}",
                unused.len(),
                unused.join("\n")
            ));
        }
    }
    if !problems.is_empty() {
        eprintln!("bdd: {}", problems.join("\n"));
        std::process::exit(1);
    }
}
