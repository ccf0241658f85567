//! How a command fails: one line on stderr that says what to do, and an exit status by kind.
//! The statuses are documented in `llorch --help` ([`EXIT_STATUS_HELP`]) and the README.

use llorch_client::ClientError;

/// The exit status of each kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A task failed, or anything not below.
    Failed = 1,
    /// Bad arguments, options or local files (or a request orchestratord refused as invalid).
    Usage = 2,
    /// The token is missing, refused, or lacks the role the command needs.
    Auth = 3,
    /// orchestratord cannot be reached, or cannot serve now.
    Unavailable = 4,
}

/// The exit statuses, for `llorch --help`.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  success
  1  a task (or a chat turn) failed, or another error
  2  usage: bad arguments, an unreadable token or CA file, or a request orchestratord refused as invalid (400, 413)
  3  authentication: the token is missing or refused (401), or may not do this (403)
  4  unavailable: orchestratord unreachable (or its TLS certificate not trusted), or it cannot serve now (503, 429)";

/// A failed command: what to print and how to exit.
#[derive(Debug)]
pub struct Failure {
    pub kind: Kind,
    message: String,
}

impl Failure {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The one line printed on stderr (without the `llorch: ` prefix): line breaks of a
    /// server's message are flattened.
    pub fn line(&self) -> String {
        self.message
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Prints the line and returns the exit status.
    pub fn report(&self) -> std::process::ExitCode {
        eprintln!("llorch: {}", self.line());
        std::process::ExitCode::from(self.kind as u8)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::new(Kind::Failed, format!("cannot write the output: {e}"))
    }
}

/// Where the failed request went: for the hints.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub token_given: bool,
}

/// At most this many characters of a server's message or body.
const MAX_DETAIL: usize = 300;

fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(MAX_DETAIL).collect();
    if s.chars().count() > MAX_DETAIL {
        out.push('…');
    }
    out
}

impl Target {
    /// The failure a client error is, with what to do about it.
    pub fn failure(&self, e: ClientError) -> Failure {
        let (status, code, message) = match e {
            ClientError::Unreachable(reason) => return self.unreachable(&reason),
            ClientError::Api { status, error } => (status, error.code.to_string(), error.message),
            ClientError::OpenAi { status, error } => {
                (status, error.code.unwrap_or(error.kind), error.message)
            }
            ClientError::Unexpected { status, body } => (status, String::new(), body),
        };
        let detail = match (code.is_empty(), clip(&message)) {
            (true, m) if m.is_empty() => format!("{status}"),
            (true, m) => format!("{status}: {m}"),
            (false, m) => format!("{status} {code}: {m}"),
        };
        match status {
            401 if self.token_given => Failure::new(
                Kind::Auth,
                "orchestratord refused the token (401): set LLORCH_API_TOKEN (or --token, --token-file) to a valid key",
            ),
            401 => Failure::new(
                Kind::Auth,
                "orchestratord wants a token (401): set LLORCH_API_TOKEN or --token (or --token-file)",
            ),
            403 => Failure::new(
                Kind::Auth,
                format!("the token may not do this ({detail}): drain, reload and nodes need the admin token"),
            ),
            400 | 413 => Failure::new(
                Kind::Usage,
                format!("orchestratord refused the request ({detail}): change the arguments"),
            ),
            429 | 503 => Failure::new(
                Kind::Unavailable,
                format!("orchestratord cannot serve this now ({detail}): retry later"),
            ),
            _ => Failure::new(Kind::Failed, format!("orchestratord answered {detail}")),
        }
    }

    fn unreachable(&self, reason: &str) -> Failure {
        let reason = clip(reason);
        let tls = [
            "certificate",
            "Certificate",
            "TLS",
            "tls",
            "InvalidContentType",
        ]
        .iter()
        .any(|w| reason.contains(w));
        let hint = if tls {
            "check its certificate: LLORCH_TLS_CA_FILE or --ca-file"
        } else {
            "is it running? set LLORCH_URL or --url"
        };
        Failure::new(
            Kind::Unavailable,
            format!(
                "cannot reach orchestratord at {}: {reason} ({hint})",
                self.url
            ),
        )
    }
}

/// A clap error as one line (`error: …` and its indented details, without the usage block).
pub fn usage_line(rendered: &str) -> String {
    let lines: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let text = lines.join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    format!("{text} (see llorch --help)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_contracts::{ErrorCode, ErrorEnvelope};

    fn target(token_given: bool) -> Target {
        Target {
            url: "http://127.0.0.1:8080".into(),
            token_given,
        }
    }

    fn api(status: u16, code: ErrorCode, message: &str) -> ClientError {
        ClientError::Api {
            status,
            error: ErrorEnvelope::new(code, message),
        }
    }

    // covers: OBS-6115
    #[test]
    fn each_answer_becomes_its_kind_with_one_line_saying_what_to_do() {
        let f = target(true).failure(api(401, ErrorCode::Unauthorized, "invalid API token"));
        assert_eq!(f.kind, Kind::Auth);
        assert!(f
            .line()
            .starts_with("orchestratord refused the token (401): set LLORCH_API_TOKEN"));
        let f = target(false).failure(api(401, ErrorCode::Unauthorized, "missing"));
        assert!(
            f.line().starts_with("orchestratord wants a token (401)"),
            "{}",
            f.line()
        );
        let f = target(true).failure(api(403, ErrorCode::Forbidden, "needs the admin role"));
        assert_eq!(f.kind, Kind::Auth);
        assert!(
            f.line().contains("403 FORBIDDEN: needs the admin role"),
            "{}",
            f.line()
        );
        let f = target(true).failure(api(503, ErrorCode::PoolUnavailable, "no pool"));
        assert_eq!(f.kind, Kind::Unavailable);
        let f = target(true).failure(api(400, ErrorCode::InvalidParams, "max_tokens\ntoo big"));
        assert_eq!(f.kind, Kind::Usage);
        assert!(!f.line().contains('\n'));
        let f = target(true).failure(api(404, ErrorCode::NotFound, "no such task"));
        assert_eq!(f.kind, Kind::Failed);
        assert_eq!(
            f.line(),
            "orchestratord answered 404 NOT_FOUND: no such task"
        );
    }

    #[test]
    fn unreachable_says_where_and_what_to_check() {
        let f = target(true).failure(ClientError::Unreachable(
            "client error (Connect): tcp connect error: Connection refused (os error 111)".into(),
        ));
        assert_eq!(f.kind, Kind::Unavailable);
        assert!(f
            .line()
            .starts_with("cannot reach orchestratord at http://127.0.0.1:8080: "));
        assert!(f
            .line()
            .ends_with("(is it running? set LLORCH_URL or --url)"));
        let f = target(true).failure(ClientError::Unreachable(
            "invalid peer certificate: UnknownIssuer".into(),
        ));
        assert!(f.line().contains("UnknownIssuer"));
        assert!(f
            .line()
            .ends_with("(check its certificate: LLORCH_TLS_CA_FILE or --ca-file)"));
    }

    #[test]
    fn a_clap_error_becomes_one_line_without_the_usage_block() {
        let rendered = "error: the following required arguments were not provided:\n  --model <MODEL>\n\nUsage: llorch submit --model <MODEL>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_line(rendered),
            "the following required arguments were not provided: --model <MODEL> (see llorch --help)"
        );
    }
}
