//! auth-min (DESIGN §5): one shared Bearer token.
//!
//! - tokens are compared timing-safe: both sides are hashed to fixed-size digests first, then
//!   compared with `subtle::ConstantTimeEq`, so neither length nor content leaks through timing;
//! - logs only ever see [`fingerprint`] (`token:<first 6 hex of SHA-256>`);
//! - [`Token`] never prints its secret, not even through `Debug`;
//! - [`check_bind`] refuses a non-loopback bind address without a token.

use std::net::SocketAddr;
use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The shared secret. `Debug` and `Display` show the fingerprint only.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
    fingerprint: String,
    secret: std::sync::Arc<str>,
}

impl Token {
    /// Wraps a token value. Surrounding whitespace (a trailing newline in a file) is removed.
    pub fn new(value: &str) -> Result<Self, AuthConfigError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(AuthConfigError::Empty);
        }
        if value.len() < 16 {
            return Err(AuthConfigError::TooShort);
        }
        let digest: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        Ok(Self {
            digest,
            fingerprint: format!("token:{}", &hex::encode(digest)[..6]),
            secret: std::sync::Arc::from(value),
        })
    }

    /// Timing-safe check of a presented token.
    pub fn verify(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.digest.ct_eq(&presented).into()
    }

    /// The secret itself, for outgoing requests to the other daemon (`Authorization: Bearer`).
    /// Never log it.
    pub fn expose(&self) -> &str {
        &self.secret
    }

    /// `token:<fp6>` — the only form of the token that may reach a log.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.fingerprint)
    }
}

/// `token:<fp6>` of any value, e.g. of a presented (wrong) token.
pub fn fingerprint(value: &str) -> String {
    format!(
        "token:{}",
        &hex::encode(Sha256::digest(value.as_bytes()))[..6]
    )
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthConfigError {
    #[error("the API token is empty")]
    Empty,
    #[error("the API token is shorter than 16 characters")]
    TooShort,
    #[error("set only one of LLORCH_API_TOKEN and LLORCH_API_TOKEN_FILE")]
    BothGiven,
    #[error("cannot read token file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error(
        "token file {path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}"
    )]
    TooOpen { path: String, mode: u32 },
    #[error("refusing to bind {addr} (not loopback) without an API token: set LLORCH_API_TOKEN or LLORCH_API_TOKEN_FILE")]
    InsecureBind { addr: SocketAddr },
    #[error("no API token configured: set LLORCH_API_TOKEN or LLORCH_API_TOKEN_FILE, or allow unauthenticated loopback clients explicitly")]
    Missing,
}

/// Loads the token from a value or a file (never both). A file readable by group or others is
/// refused.
pub fn load_token(
    value: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<Token>, AuthConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(AuthConfigError::BothGiven),
        (Some(v), None) => Token::new(v).map(Some),
        (None, Some(path)) => {
            let shown = path.display().to_string();
            let meta = std::fs::metadata(path).map_err(|e| AuthConfigError::Unreadable {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
            let mode = unix_mode(&meta);
            if mode & 0o077 != 0 {
                return Err(AuthConfigError::TooOpen {
                    path: shown,
                    mode: mode & 0o777,
                });
            }
            let text = std::fs::read_to_string(path).map_err(|e| AuthConfigError::Unreadable {
                path: shown,
                reason: e.to_string(),
            })?;
            Token::new(&text).map(Some)
        }
        (None, None) => Ok(None),
    }
}

#[cfg(unix)]
fn unix_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode()
}

#[cfg(not(unix))]
fn unix_mode(_meta: &std::fs::Metadata) -> u32 {
    0o600
}

/// Startup rule: a token is required unless the daemon binds loopback only and the operator
/// explicitly allowed unauthenticated loopback clients.
pub fn check_bind(
    addr: SocketAddr,
    token: Option<&Token>,
    allow_unauthenticated_loopback: bool,
) -> Result<(), AuthConfigError> {
    match token {
        Some(_) => Ok(()),
        None if !addr.ip().is_loopback() => Err(AuthConfigError::InsecureBind { addr }),
        None if allow_unauthenticated_loopback => Ok(()),
        None => Err(AuthConfigError::Missing),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing Authorization header")]
    Missing,
    #[error("malformed Authorization header: expected 'Bearer <token>'")]
    Malformed,
    #[error("invalid API token")]
    Invalid,
}

/// Checks an `Authorization` header value against the configured token.
pub fn authorize(header: Option<&[u8]>, token: &Token) -> Result<(), AuthError> {
    let raw = header.ok_or(AuthError::Missing)?;
    let text = std::str::from_utf8(raw).map_err(|_| AuthError::Malformed)?;
    let (scheme, rest) = text.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    let presented = rest.trim();
    if presented.is_empty() || presented.contains(' ') {
        return Err(AuthError::Malformed);
    }
    if token.verify(presented) {
        Ok(())
    } else {
        Err(AuthError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "correct-horse-battery-staple";

    #[test]
    fn debug_never_shows_the_secret() {
        let t = Token::new(SECRET).unwrap();
        let shown = format!("{t:?}");
        assert!(!shown.contains(SECRET));
        assert!(shown.starts_with("token:"));
        assert_eq!(shown.len(), "token:".len() + 6);
        assert_eq!(shown, fingerprint(SECRET));
    }

    #[test]
    fn authorize_accepts_only_the_right_bearer_token() {
        let t = Token::new(SECRET).unwrap();
        let ok = format!("Bearer {SECRET}");
        assert_eq!(authorize(Some(ok.as_bytes()), &t), Ok(()));
        let lower = format!("bearer {SECRET}");
        assert_eq!(authorize(Some(lower.as_bytes()), &t), Ok(()));
        assert_eq!(authorize(None, &t), Err(AuthError::Missing));
        assert_eq!(authorize(Some(b"Basic abc"), &t), Err(AuthError::Malformed));
        assert_eq!(authorize(Some(b"Bearer"), &t), Err(AuthError::Malformed));
        assert_eq!(
            authorize(Some(b"Bearer wrong-token-value"), &t),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            authorize(Some(&[0x42, 0xff, 0x20, 0x41]), &t),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn insecure_bind_is_refused_without_token() {
        let public: SocketAddr = "0.0.0.0:9200".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:9200".parse().unwrap();
        let t = Token::new(SECRET).unwrap();
        assert!(matches!(
            check_bind(public, None, true),
            Err(AuthConfigError::InsecureBind { .. })
        ));
        assert!(check_bind(public, Some(&t), false).is_ok());
        assert_eq!(check_bind(lo, None, false), Err(AuthConfigError::Missing));
        assert!(check_bind(lo, None, true).is_ok());
    }

    #[test]
    fn token_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{SECRET}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_token(None, Some(&path)),
            Err(AuthConfigError::TooOpen { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = load_token(None, Some(&path)).unwrap().unwrap();
        assert!(t.verify(SECRET));
        assert_eq!(
            load_token(Some(SECRET), Some(&path)).unwrap_err(),
            AuthConfigError::BothGiven
        );
        assert_eq!(
            load_token(Some("  "), None).unwrap_err(),
            AuthConfigError::Empty
        );
    }
}
