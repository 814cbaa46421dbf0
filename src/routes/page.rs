//! The page at `/`: register, log in and chat in a browser, from one HTML file built into
//! the binary (no build step, no external assets), sent with headers that keep it from
//! being framed, sniffed or made to run anything but its own script.

use std::sync::LazyLock;

use axum::{
    http::{header, HeaderName, HeaderValue},
    response::{Html, IntoResponse},
};
use base64::{engine::general_purpose::STANDARD, Engine};
use sha2::{Digest, Sha256};

const PAGE: &str = include_str!("page.html");

/// The page's security headers, built once. Its one script and one style sheet are inline,
/// so the policy names them by hash: nothing else, injected or loaded, may run or style it.
static HEADERS: LazyLock<[(HeaderName, HeaderValue); 5]> = LazyLock::new(|| {
    let policy = format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        inline_hash(PAGE, "script"),
        inline_hash(PAGE, "style"),
    );
    [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::try_from(policy).expect("a policy of ASCII text is a header value"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ]
});

pub async fn page() -> impl IntoResponse {
    (HEADERS.clone(), Html(PAGE))
}

/// The CSP source of the first inline `<tag>` element of `html`: `sha256-` and the base64
/// of its content's SHA-256.
fn inline_hash(html: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = html.find(&open).map(|at| at + open.len());
    let content = start
        .and_then(|start| Some(&html[start..start + html[start..].find(&close)?]))
        .unwrap_or_else(|| panic!("the page has a <{tag}> element"));
    format!(
        "sha256-{}",
        STANDARD.encode(Sha256::digest(content.as_bytes()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_exactly_one_inline_script_and_style_and_no_inline_attributes() {
        // The policy names one script and one style by hash: a second one would not run.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        for attribute in [" style=\"", " onclick=", " onload=", " onsubmit="] {
            assert!(!PAGE.contains(attribute), "{attribute}");
        }
        assert!(inline_hash(PAGE, "script").starts_with("sha256-"));
    }
}
