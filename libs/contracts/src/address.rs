//! The base URL of another daemon or of an engine, checked before anything is sent there: a
//! registered node's address, a configured pool-managerd, a handoff file's engine url. Each
//! receives requests (and, for a node, its token), so only a plain `scheme://host[:port][/path]`
//! passes: no user info, query or fragment, and `https` only while TLS is on.

use std::fmt;

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    NotUrl(String),
    Scheme(String),
    NoHost,
    UserInfo,
    Query,
    Fragment,
    PlainHttpWithTls,
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUrl(why) => write!(f, "not a URL ({why})"),
            Self::Scheme(s) => write!(f, "scheme {s:?} is not http or https"),
            Self::NoHost => f.write_str("it names no host"),
            Self::UserInfo => f.write_str("it carries a user name or password"),
            Self::Query => f.write_str("it carries a query"),
            Self::Fragment => f.write_str("it carries a fragment"),
            Self::PlainHttpWithTls => {
                f.write_str("it is http:// while TLS is on (node addresses must be https://)")
            }
        }
    }
}

impl std::error::Error for AddressError {}

/// Which schemes an address may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schemes {
    /// `http` or `https`.
    Any,
    /// `https` only (TLS is on between the daemons).
    HttpsOnly,
    /// `http` only (engines on a node's loopback).
    HttpOnly,
}

/// `raw` checked and written in one canonical form (lower-case host, no default port, no
/// trailing `/`), so two spellings of one address compare equal.
pub fn base_url(raw: &str, schemes: Schemes) -> Result<String, AddressError> {
    let url = url::Url::parse(raw.trim()).map_err(|e| AddressError::NotUrl(e.to_string()))?;
    match (url.scheme(), schemes) {
        ("http", Schemes::HttpsOnly) => return Err(AddressError::PlainHttpWithTls),
        ("https", Schemes::HttpOnly) => return Err(AddressError::Scheme("https".into())),
        ("http" | "https", _) => {}
        (other, _) => return Err(AddressError::Scheme(other.into())),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(AddressError::NoHost);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(AddressError::UserInfo);
    }
    if url.query().is_some() {
        return Err(AddressError::Query);
    }
    if url.fragment().is_some() {
        return Err(AddressError::Fragment);
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_spellings_of_one_address_are_one_address() {
        for raw in [
            "http://Node-A:9200",
            "http://node-a:9200/",
            " http://NODE-A:9200// ",
        ] {
            assert_eq!(
                base_url(raw, Schemes::Any).as_deref(),
                Ok("http://node-a:9200")
            );
        }
        assert_eq!(
            base_url("https://10.0.0.2:443/", Schemes::Any).as_deref(),
            Ok("https://10.0.0.2")
        );
        assert_eq!(
            base_url("http://[::1]:9200/prefix/", Schemes::Any).as_deref(),
            Ok("http://[::1]:9200/prefix")
        );
    }

    #[test]
    fn anything_but_a_plain_base_url_is_refused_with_its_reason() {
        use AddressError::*;
        let refused = |raw: &str, schemes| base_url(raw, schemes).err();
        assert!(matches!(
            refused("node-a:9200", Schemes::Any),
            Some(Scheme(_) | NotUrl(_))
        ));
        assert!(matches!(
            refused("file:///etc/passwd", Schemes::Any),
            Some(Scheme(_))
        ));
        assert!(matches!(
            refused("gopher://a:70", Schemes::Any),
            Some(Scheme(_))
        ));
        assert_eq!(refused("http://u:p@a:9200", Schemes::Any), Some(UserInfo));
        assert_eq!(refused("http://u@a:9200", Schemes::Any), Some(UserInfo));
        assert_eq!(refused("http://a:9200/?x=1", Schemes::Any), Some(Query));
        assert_eq!(refused("http://a:9200/#x", Schemes::Any), Some(Fragment));
        assert_eq!(
            refused("http://a:9200", Schemes::HttpsOnly),
            Some(PlainHttpWithTls)
        );
        assert_eq!(
            refused("https://127.0.0.1:8081", Schemes::HttpOnly),
            Some(Scheme("https".into()))
        );
        assert!(matches!(
            refused("http://", Schemes::Any),
            Some(NotUrl(_) | NoHost)
        ));
    }
}
