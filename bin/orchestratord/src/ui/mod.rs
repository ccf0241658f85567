//! The operator console at `/ui`: one page, its script and its style sheet, embedded in the
//! binary (no build step, nothing fetched from elsewhere). They are served without a key: they
//! hold no data. The page asks for the admin token, keeps it in the tab's `sessionStorage` and
//! sends it as `Authorization: Bearer` on its calls to `GET /v2/overview` and the pools' drain
//! and reload.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const PAGE: &str = include_str!("console.html");
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

/// Only this origin's script, style and API; no inline code, no frames, no forms posted
/// anywhere, no plugins.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

pub(crate) fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/ui",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/ui/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/console.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The page stores nothing; nothing stores the page (a new build serves a new one).
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    // covers: OBS-6111
    #[test]
    fn the_assets_load_nothing_from_elsewhere_and_run_no_inline_code() {
        for (name, text) in [("page", PAGE), ("script", SCRIPT), ("style", STYLE)] {
            // The SVG namespace is a name, not an address anything is fetched from.
            let text = text.replace("'http://www.w3.org/2000/svg'", "");
            for banned in ["http://", "https://", "//cdn", "@import", "url(", "eval("] {
                assert!(!text.contains(banned), "{name} holds {banned:?}");
            }
        }
        // The page's only script and style are the served ones, and it has no inline handlers.
        assert!(PAGE.contains(r#"<script src="/ui/console.js" defer></script>"#));
        assert!(PAGE.contains(r#"<link rel="stylesheet" href="/ui/console.css">"#));
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert!(!PAGE.contains("<style") && !PAGE.contains("style="));
        // An attribute `on<name>` after any whitespace, with or without spaces before `=`.
        let mut page = PAGE.to_string();
        for gap in [" =", "\t=", "\n="] {
            while page.contains(gap) {
                page = page.replace(gap, "=");
            }
        }
        let handlers = page.split(char::is_whitespace).filter(|word| {
            let Some(rest) = word.strip_prefix("on") else {
                return false;
            };
            let name: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert_eq!(handlers.count(), 0, "inline event handlers in the page");
        // Nor code made from strings in the script.
        for banned in [
            "new Function",
            "setTimeout('",
            "setTimeout(\"",
            "setInterval('",
            "setInterval(\"",
        ] {
            assert!(!SCRIPT.contains(banned), "script holds {banned:?}");
        }
        // The token lives in the tab's sessionStorage only; text from the API is never parsed
        // as HTML.
        assert!(SCRIPT.contains("sessionStorage") && !SCRIPT.contains("localStorage"));
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("document.write"));
        assert!(!SCRIPT.contains("document.cookie"));
    }
}
