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
    #[error("set only one of {0} and {0}_FILE")]
    BothGiven(&'static str),
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
    #[error("key {0:?} is given twice (names and secrets must each name one key)")]
    Duplicate(String),
    #[error("keys file {path}, line {line}: {reason}")]
    KeysFile {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Loads the token from a value or a file (never both). A file readable by group or others is
/// refused.
pub fn load_token(
    value: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<Token>, AuthConfigError> {
    load_token_as("LLORCH_API_TOKEN", value, file)
}

/// [`load_token`] for the variable `variable` (and `{variable}_FILE`).
pub fn load_token_as(
    variable: &'static str,
    value: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<Token>, AuthConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(AuthConfigError::BothGiven(variable)),
        (Some(v), None) => Token::new(v).map(Some),
        (None, Some(path)) => Token::new(&read_secret_file(path)?).map(Some),
        (None, None) => Ok(None),
    }
}

/// A file of secrets, refused when group or others may read it — unless it is one of the
/// service's systemd credentials (under `$CREDENTIALS_DIRECTORY`): systemd keeps those
/// readable by the service alone, and from version 256 grants that with an ACL that shows in
/// the mode as group read.
pub fn read_secret_file(path: &Path) -> Result<String, AuthConfigError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    read_secret_file_in(path, credentials.as_deref())
}

fn read_secret_file_in(path: &Path, credentials: Option<&Path>) -> Result<String, AuthConfigError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| AuthConfigError::Unreadable {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let mode = unix_mode(&meta);
    let systemd_credential = credentials.is_some_and(|dir| {
        match (std::fs::canonicalize(dir), std::fs::canonicalize(path)) {
            (Ok(dir), Ok(file)) => file.starts_with(dir),
            _ => false,
        }
    });
    if mode & 0o077 != 0 && !systemd_credential {
        return Err(AuthConfigError::TooOpen {
            path: shown,
            mode: mode & 0o777,
        });
    }
    std::fs::read_to_string(path).map_err(|e| AuthConfigError::Unreadable {
        path: shown,
        reason: e.to_string(),
    })
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

/// The token of a `Bearer <token>` header value.
fn bearer(header: Option<&[u8]>) -> Result<&str, AuthError> {
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
    Ok(presented)
}

/// Checks an `Authorization` header value against the configured token.
pub fn authorize(header: Option<&[u8]>, token: &Token) -> Result<(), AuthError> {
    if token.verify(bearer(header)?) {
        Ok(())
    } else {
        Err(AuthError::Invalid)
    }
}

/// What a caller may do: submit and follow its own tasks (client), operate pools, nodes and
/// everyone's tasks (admin), or speak for a node (node: registration, heartbeats, the traffic
/// between the daemons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Admin,
    Node,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Admin => "admin",
            Role::Node => "node",
        }
    }
}

/// What one key may take: admissions per second (a token bucket of `burst`) and tasks
/// unfinished at once. `None`: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct KeyLimits {
    pub rate_per_s: Option<f64>,
    pub burst: Option<u32>,
    pub concurrent: Option<u32>,
    /// Streams (event subscriptions, streamed answers) open at once.
    pub conns: Option<u32>,
}

impl KeyLimits {
    pub fn is_none(&self) -> bool {
        self.rate_per_s.is_none() && self.concurrent.is_none() && self.conns.is_none()
    }

    /// `rate=R burst=B concurrent=C conns=N`, each optional, in any order.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut limits = KeyLimits::default();
        for part in text.split_whitespace() {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected name=value"))?;
            match name {
                "rate" => match value.parse::<f64>() {
                    Ok(r) if r > 0.0 && r.is_finite() => limits.rate_per_s = Some(r),
                    _ => {
                        return Err(format!(
                            "rate {value:?}: a number of admissions per second above 0"
                        ))
                    }
                },
                "burst" => match value.parse::<u32>() {
                    Ok(b) if b >= 1 => limits.burst = Some(b),
                    _ => return Err(format!("burst {value:?}: a whole number of at least 1")),
                },
                "concurrent" => match value.parse::<u32>() {
                    Ok(c) if c >= 1 => limits.concurrent = Some(c),
                    _ => {
                        return Err(format!(
                            "concurrent {value:?}: a whole number of at least 1"
                        ))
                    }
                },
                "conns" => match value.parse::<u32>() {
                    Ok(c) if c >= 1 => limits.conns = Some(c),
                    _ => return Err(format!("conns {value:?}: a whole number of at least 1")),
                },
                other => {
                    return Err(format!(
                        "unknown limit {other:?} (rate, burst, concurrent, conns)"
                    ))
                }
            }
        }
        if limits.burst.is_some() && limits.rate_per_s.is_none() {
            return Err("burst needs a rate".into());
        }
        Ok(limits)
    }
}

/// Who presented a key: its name (for logs, metrics and task ownership; never the secret),
/// the roles it holds and its limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub name: std::sync::Arc<str>,
    roles: [bool; 3],
    pub limits: KeyLimits,
    /// The one node this key speaks for (a per-node token), if it is bound to one.
    pub node: Option<std::sync::Arc<str>>,
}

impl Principal {
    pub fn new(name: &str, roles: &[Role]) -> Self {
        let mut held = [false; 3];
        for r in roles {
            held[*r as usize] = true;
        }
        Self {
            name: std::sync::Arc::from(name),
            roles: held,
            limits: KeyLimits::default(),
            node: None,
        }
    }

    /// A node's own token: the node role, for node `node_id` only (named `node/<id>`).
    pub fn for_node(node_id: &str) -> Self {
        let mut p = Self::new(&format!("node/{node_id}"), &[Role::Node]);
        p.node = Some(std::sync::Arc::from(node_id));
        p
    }

    pub fn with_limits(mut self, limits: KeyLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Every role: the one shared token of a single-operator setup, or no authentication at
    /// all (allowed on loopback only).
    pub fn everything(name: &str) -> Self {
        Self::new(name, &[Role::Client, Role::Admin, Role::Node])
    }

    pub fn may(&self, role: Role) -> bool {
        self.roles[role as usize]
    }
}

/// Every key a daemon accepts, each with its principal.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: Vec<(Principal, Token)>,
}

impl Keyring {
    /// Adds a key; refused when its secret or its name is already there (a secret must name one
    /// principal).
    pub fn add(&mut self, principal: Principal, token: Token) -> Result<(), AuthConfigError> {
        if self.keys.iter().any(|(_, t)| t.digest == token.digest) {
            return Err(AuthConfigError::Duplicate(principal.name.to_string()));
        }
        if self.keys.iter().any(|(p, _)| p.name == principal.name) {
            return Err(AuthConfigError::Duplicate(principal.name.to_string()));
        }
        self.keys.push((principal, token));
        Ok(())
    }

    /// Keeps only the keys whose principal `keep` accepts (a reload of the client keys file
    /// drops the old client keys and keeps the admin and node tokens).
    pub fn retain(&mut self, keep: impl Fn(&Principal) -> bool) {
        self.keys.retain(|(p, _)| keep(p));
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The principal whose key the header presents. The presented token is hashed once and
    /// compared with every key in constant time, all of them every time.
    pub fn identify(&self, header: Option<&[u8]>) -> Result<Principal, AuthError> {
        let presented: [u8; 32] = Sha256::digest(bearer(header)?.as_bytes()).into();
        let mut found = None;
        for (principal, token) in &self.keys {
            let equal: bool = token.digest.ct_eq(&presented).into();
            if equal && found.is_none() {
                found = Some(principal);
            }
        }
        found.cloned().ok_or(AuthError::Invalid)
    }
}

/// Whether `name` may name a key: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn valid_key_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A keys file: one `name:secret` per line, optionally followed by limits (`rate=2 burst=5
/// concurrent=4`); blank lines and `#` comments are skipped. Like a token file, it is refused
/// when group or others may read it.
pub fn load_keys_file(path: &Path) -> Result<Vec<(String, Token, KeyLimits)>, AuthConfigError> {
    let text = read_secret_file(path)?;
    let shown = path.display().to_string();
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: &str| AuthConfigError::KeysFile {
            path: shown.clone(),
            line: n + 1,
            reason: reason.to_string(),
        };
        let (name, rest) = line
            .split_once(':')
            .ok_or_else(|| bad("expected name:secret"))?;
        let name = name.trim();
        if !valid_key_name(name) {
            return Err(bad("a key name is 1-64 characters of A-Z a-z 0-9 . _ -"));
        }
        let rest = rest.trim_start();
        let (secret, limits) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let token = Token::new(secret).map_err(|e| bad(&e.to_string()))?;
        let limits = KeyLimits::parse(limits).map_err(|e| bad(&e))?;
        keys.push((name.to_string(), token, limits));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "correct-horse-battery-staple";

    // covers: AUTH-5107
    #[test]
    fn debug_never_shows_the_secret() {
        let t = Token::new(SECRET).unwrap();
        let shown = format!("{t:?}");
        assert!(!shown.contains(SECRET));
        assert!(shown.starts_with("token:"));
        assert_eq!(shown.len(), "token:".len() + 6);
        assert_eq!(shown, fingerprint(SECRET));
    }

    // covers: AUTH-5103
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

    // covers: AUTH-5109
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

    // covers: AUTH-5108
    #[test]
    fn a_group_readable_systemd_credential_is_accepted_and_the_same_file_elsewhere_is_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        std::fs::create_dir(&creds).unwrap();
        // systemd 256 grants the service user read access with an ACL: the mode reads 0440.
        let inside = creds.join("node-token");
        let outside = dir.path().join("node-token");
        for path in [&inside, &outside] {
            std::fs::write(path, format!("{SECRET}\n")).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o440)).unwrap();
        }
        assert_eq!(
            read_secret_file_in(&inside, Some(&creds)).unwrap().trim(),
            SECRET
        );
        assert!(matches!(
            read_secret_file_in(&outside, Some(&creds)),
            Err(AuthConfigError::TooOpen { .. })
        ));
        assert!(matches!(
            read_secret_file_in(&inside, None),
            Err(AuthConfigError::TooOpen { .. })
        ));
        // A path that climbs out of the credentials directory is not inside it.
        let climbing = creds.join("..").join("node-token");
        assert!(matches!(
            read_secret_file_in(&climbing, Some(&creds)),
            Err(AuthConfigError::TooOpen { .. })
        ));
    }

    // covers: AUTH-5108
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
            AuthConfigError::BothGiven("LLORCH_API_TOKEN")
        );
        assert_eq!(
            load_token(Some("  "), None).unwrap_err(),
            AuthConfigError::Empty
        );
    }

    // covers: AUTH-5103
    #[test]
    fn a_keyring_names_who_presented_a_key_and_what_it_may_do() {
        let mut ring = Keyring::default();
        let alice = Token::new("alice-secret-0123456789").unwrap();
        let admin = Token::new("admin-secret-0123456789").unwrap();
        ring.add(Principal::new("alice", &[Role::Client]), alice)
            .unwrap();
        ring.add(Principal::new("admin", &[Role::Admin, Role::Client]), admin)
            .unwrap();
        let who = |h: &str| ring.identify(Some(h.as_bytes()));
        let a = who("Bearer alice-secret-0123456789").unwrap();
        assert_eq!(&*a.name, "alice");
        assert!(a.may(Role::Client) && !a.may(Role::Admin) && !a.may(Role::Node));
        assert!(who("Bearer admin-secret-0123456789")
            .unwrap()
            .may(Role::Admin));
        assert_eq!(
            who("Bearer nobody-secret-012345678"),
            Err(AuthError::Invalid)
        );
        assert_eq!(ring.identify(None), Err(AuthError::Missing));
        // One secret, one principal; one name, one secret.
        let again = Token::new("alice-secret-0123456789").unwrap();
        assert!(ring
            .add(Principal::new("bob", &[Role::Client]), again)
            .is_err());
        let other = Token::new("other-secret-0123456789").unwrap();
        assert!(ring
            .add(Principal::new("alice", &[Role::Client]), other)
            .is_err());
    }

    // covers: AUTH-5108
    #[test]
    fn a_keys_file_holds_name_secret_lines_and_is_refused_when_open_or_malformed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(
            &path,
            "# clients\nalice:alice-secret-0123456789\n\nbob: bob-secret-01234567890\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let keys = load_keys_file(&path).unwrap();
        let names: Vec<&str> = keys.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["alice", "bob"]);
        assert!(keys[1].1.verify("bob-secret-01234567890"));
        assert!(keys[1].2.is_none());
        std::fs::write(
            &path,
            "carol:carol-secret-0123456789 rate=2.5 burst=5 concurrent=3 conns=7\n",
        )
        .unwrap();
        let keys = load_keys_file(&path).unwrap();
        let want = KeyLimits {
            rate_per_s: Some(2.5),
            burst: Some(5),
            concurrent: Some(3),
            conns: Some(7),
        };
        assert_eq!(keys[0].2, want);
        assert!(keys[0].1.verify("carol-secret-0123456789"));
        for bad in [
            "rate=0",
            "burst=2",
            "concurrent=0",
            "conns=0",
            "speed=1",
            "rate",
        ] {
            std::fs::write(&path, format!("carol:carol-secret-0123456789 {bad}\n")).unwrap();
            assert!(load_keys_file(&path).is_err(), "{bad}");
        }
        std::fs::write(&path, "no colon here\n").unwrap();
        assert!(matches!(
            load_keys_file(&path),
            Err(AuthConfigError::KeysFile { line: 1, .. })
        ));
        std::fs::write(&path, "bad name!:alice-secret-0123456789\n").unwrap();
        assert!(load_keys_file(&path).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            load_keys_file(&path),
            Err(AuthConfigError::TooOpen { .. })
        ));
    }
}
