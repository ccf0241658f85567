//! Old names of environment variables, still accepted. Each daemon lists the names it was
//! configured with before a rename (`ENV_ALIASES` in its `config.rs`) and the name that
//! replaced each. They are resolved as the command line is parsed, before anything else runs:
//!
//! - an old name counts only while its new name is unset, and a command-line flag beats both
//!   (the old name's value becomes the setting's default);
//! - both names set to different values refuse the start (which one was meant is unknowable);
//! - every old name in use is logged once logging is up ([`log_renamed`]), naming the new one.
//!
//! Nothing is written to the process environment: clap reads the old value as a default.

use std::ffi::{OsStr, OsString};

/// One renamed variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvAlias {
    /// The name operators may still use.
    pub old: &'static str,
    /// The name the daemon reads (an `env = "…"` of its clap arguments).
    pub new: &'static str,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AliasError {
    #[error("{old} and {new} are both set, to different values: {old} is the old name of {new}; keep only {new}")]
    Conflict {
        old: &'static str,
        new: &'static str,
    },
    #[error("{old} is not valid UTF-8")]
    NotUnicode { old: &'static str },
    /// A programming error: the alias names a variable no argument reads.
    #[error("{new} (the new name of {old}) is not a setting of this daemon")]
    UnknownSetting {
        old: &'static str,
        new: &'static str,
    },
}

/// `var`'s value when it is set and not empty (clap treats an empty variable as unset too).
fn value(lookup: &impl Fn(&str) -> Option<OsString>, var: &str) -> Option<OsString> {
    lookup(var).filter(|v| !v.is_empty())
}

/// The command `A` parses with, every old name in use applied as the default of its setting;
/// also the aliases in use (to log). `lookup` reads a variable (the process environment, or a
/// test's map). The command's help lists the old names.
pub fn command_with<A: clap::CommandFactory>(
    aliases: &[EnvAlias],
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<(clap::Command, Vec<EnvAlias>), AliasError> {
    let mut cmd = A::command();
    let mut in_use = Vec::new();
    for alias in aliases {
        let Some(id) = cmd
            .get_arguments()
            .find(|a| a.get_env() == Some(OsStr::new(alias.new)))
            .map(|a| a.get_id().clone())
        else {
            return Err(AliasError::UnknownSetting {
                old: alias.old,
                new: alias.new,
            });
        };
        let Some(old) = value(&lookup, alias.old) else {
            continue;
        };
        match value(&lookup, alias.new) {
            Some(new) if new != old => {
                return Err(AliasError::Conflict {
                    old: alias.old,
                    new: alias.new,
                })
            }
            // The same value under both names: the new name is read, the old one still logged.
            Some(_) => {}
            None => {
                let old = old
                    .into_string()
                    .map_err(|_| AliasError::NotUnicode { old: alias.old })?;
                // clap keeps defaults as `&'static str` (without its `string` feature): a few
                // bytes per old name in use, once per process.
                let old: &'static str = Box::leak(old.into_boxed_str());
                cmd = cmd.mut_arg(id, |a| a.default_value(old));
            }
        }
        in_use.push(*alias);
    }
    if !aliases.is_empty() {
        let listed: Vec<String> = aliases
            .iter()
            .map(|a| format!("  {} → {}", a.old, a.new))
            .collect();
        cmd = cmd.after_help(format!(
            "Old variable names, still read when the new one is unset (deprecated):\n{}",
            listed.join("\n")
        ));
    }
    Ok((cmd, in_use))
}

/// Parses `A` from the process's command line and environment, old names included. A usage
/// error (or `--help`) exits as clap does; an alias conflict is returned.
pub fn parse<A: clap::Parser>(aliases: &[EnvAlias]) -> Result<(A, Vec<EnvAlias>), AliasError> {
    let (cmd, in_use) = command_with::<A>(aliases, |v| std::env::var_os(v))?;
    let mut matches = cmd.get_matches();
    match A::from_arg_matches_mut(&mut matches) {
        Ok(args) => Ok((args, in_use)),
        Err(e) => e.exit(),
    }
}

/// Logs each old name in use (call once logging is initialised).
pub fn log_renamed(in_use: &[EnvAlias]) {
    for a in in_use {
        tracing::warn!(
            old = a.old,
            new = a.new,
            "deprecated environment variable name: read as its new name; rename it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{FromArgMatches, Parser};

    #[derive(Parser, Debug)]
    struct Args {
        #[arg(long, env = "TEST_NEW_INTERVAL_MS", default_value_t = 1000)]
        interval_ms: u64,
        #[arg(long, env = "TEST_NEW_PORT")]
        port: Option<u16>,
    }

    const ALIASES: &[EnvAlias] = &[
        EnvAlias {
            old: "TEST_OLD_INTERVAL_MS",
            new: "TEST_NEW_INTERVAL_MS",
        },
        EnvAlias {
            old: "TEST_OLD_PORT",
            new: "TEST_NEW_PORT",
        },
    ];

    fn parse_with(env: &[(&str, &str)], argv: &[&str]) -> Result<(Args, Vec<EnvAlias>), String> {
        let map: std::collections::HashMap<String, OsString> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        let (cmd, in_use) =
            command_with::<Args>(ALIASES, |v| map.get(v).cloned()).map_err(|e| e.to_string())?;
        let m = cmd
            .try_get_matches_from(std::iter::once("t").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        Ok((
            Args::from_arg_matches(&m).map_err(|e| e.to_string())?,
            in_use,
        ))
    }

    #[test]
    fn an_old_name_is_read_while_its_new_name_is_unset_and_a_flag_beats_it() {
        let (a, in_use) = parse_with(&[("TEST_OLD_INTERVAL_MS", "250")], &[]).unwrap();
        assert_eq!(a.interval_ms, 250);
        assert_eq!(in_use, vec![ALIASES[0]]);
        let (a, _) = parse_with(&[("TEST_OLD_INTERVAL_MS", "250")], &["--interval-ms=7"]).unwrap();
        assert_eq!(a.interval_ms, 7);
        let (a, in_use) = parse_with(&[], &[]).unwrap();
        assert_eq!((a.interval_ms, a.port), (1000, None));
        assert!(in_use.is_empty());
        let (a, _) = parse_with(&[("TEST_OLD_PORT", "9464")], &[]).unwrap();
        assert_eq!(a.port, Some(9464));
    }

    // covers: AUTH-5114
    #[test]
    fn both_names_with_different_values_refuse_and_the_same_value_is_accepted() {
        let e =
            parse_with(&[("TEST_OLD_PORT", "9464"), ("TEST_NEW_PORT", "9465")], &[]).unwrap_err();
        assert!(
            e.contains("TEST_OLD_PORT and TEST_NEW_PORT are both set"),
            "{e}"
        );
        let (_, in_use) =
            parse_with(&[("TEST_OLD_PORT", "9464"), ("TEST_NEW_PORT", "9464")], &[]).unwrap();
        assert_eq!(in_use, vec![ALIASES[1]], "still logged as deprecated");
        // An empty old name is unset.
        let (_, in_use) = parse_with(&[("TEST_OLD_PORT", "")], &[]).unwrap();
        assert!(in_use.is_empty());
    }

    #[test]
    fn an_alias_to_a_setting_that_does_not_exist_is_an_error() {
        let e = command_with::<Args>(
            &[EnvAlias {
                old: "X_OLD",
                new: "X_NEW",
            }],
            |_| None,
        )
        .unwrap_err();
        assert_eq!(
            e,
            AliasError::UnknownSetting {
                old: "X_OLD",
                new: "X_NEW"
            }
        );
    }

    #[test]
    fn the_help_lists_the_old_names() {
        let (mut cmd, _) = command_with::<Args>(ALIASES, |_| None).unwrap();
        let help = cmd.render_long_help().to_string();
        assert!(
            help.contains("TEST_OLD_INTERVAL_MS → TEST_NEW_INTERVAL_MS"),
            "{help}"
        );
    }
}
