//! The web playground: `GET /` serves one page (with `GET /playground/app.js` and
//! `GET /playground/style.css`) compiled into the binary from `src/server/playground/`. Plain
//! HTML, CSS and JavaScript, no build step and no external resource, so it works offline.
//!
//! The page chats with streaming (SSE read through `fetch`), compares one prompt across two or
//! three targets (the base, an adapter or a weighted stack) in parallel columns with tokens/s,
//! and lists the adapters (`GET /v1/adapters`, names only from `/v1/models` when refused). It
//! holds no data itself, so it needs no key; its calls to `/v1` send the API key typed into it
//! (kept in the browser's localStorage). Every answer carries a Content-Security-Policy that
//! allows this server's own scripts, styles and API only.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("playground/index.html");
const APP_JS: &str = include_str!("playground/app.js");
const STYLE_CSS: &str = include_str!("playground/style.css");

/// Only this origin's scripts, styles and API; no inline code, frames, plugins or form posts.
/// (`img-src data:` is the empty favicon, so the browser does not ask for `/favicon.ico`.)
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file with its type and the page's security headers.
fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // Small, and it changes with the binary: always revalidated.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset(INDEX_HTML, "text/html; charset=utf-8")
}

async fn app_js() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

async fn style_css() -> Response {
    asset(STYLE_CSS, "text/css; charset=utf-8")
}

/// `GET /` and its two assets (outside `/v1`, so the auth layer lets them through).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/playground/app.js", get(app_js))
        .route("/playground/style.css", get(style_css))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_its_assets_from_this_server_only() {
        assert!(INDEX_HTML.contains(r#"src="/playground/app.js""#));
        assert!(INDEX_HTML.contains(r#"href="/playground/style.css""#));
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("style.css", STYLE_CSS),
        ] {
            assert!(!text.contains("://"), "{name} names an external URL");
            assert!(!text.contains("@import"), "{name} imports a stylesheet");
        }
        // No inline script or style: the CSP would block them.
        assert!(!INDEX_HTML.contains("<script>") && !INDEX_HTML.contains("<style"));
        assert!(!INDEX_HTML.contains(" style=") && !INDEX_HTML.contains(" onclick="));
    }

    #[test]
    fn every_element_the_script_looks_up_by_id_is_in_the_page() {
        let ids = regex::Regex::new(r#"\$\('#([A-Za-z0-9_-]+)"#).unwrap();
        let mut seen = 0;
        for c in ids.captures_iter(APP_JS) {
            let id = &c[1];
            assert!(
                INDEX_HTML.contains(&format!(r#"id="{id}""#)),
                "app.js uses #{id}, which index.html lacks"
            );
            seen += 1;
        }
        assert!(
            seen > 20,
            "only {seen} ids found: did the lookup helper change?"
        );
    }

    #[test]
    fn assets_carry_their_type_and_the_security_policy() {
        for (resp, ty) in [
            (asset(INDEX_HTML, "text/html; charset=utf-8"), "text/html"),
            (
                asset(APP_JS, "text/javascript; charset=utf-8"),
                "text/javascript",
            ),
        ] {
            let h = resp.headers();
            assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with(ty));
            let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(csp.starts_with("default-src 'none'"), "{csp}");
            assert!(!csp.contains('*') && !csp.contains("unsafe"), "{csp}");
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
    }
}
