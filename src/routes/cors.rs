//! CORS, as tower-http's `CorsLayer::permissive()` answered it: any origin, method and
//! header (`Authorization` named as well), every response header exposed, no credentials;
//! or, with `CORS_ORIGINS`, only the pages of the origins listed.
//!
//! Written here rather than taken from tower-http because its layer builds a header map and
//! joins its `Vary` value anew for every response: 12 of the 45 allocations a `GET /health`
//! still made once the other layers were concrete (BENCHMARKS.md, issue 23). These headers
//! are constants. Browsers may call the API from any origin: it authenticates by header,
//! never by cookie, so there are no ambient credentials for another site to use. What
//! another site's page can still do is call it from the user's address (a login attempt, a
//! registration), which `CORS_ORIGINS` stops: a request of an origin not listed is refused
//! before anything is done with it.

use axum::{
    body::Body,
    extract::Request,
    http::{header, HeaderMap, HeaderValue, Method},
    response::Response,
};

const ANY: HeaderValue = HeaderValue::from_static("*");
/// Any request header, and `Authorization` by name: the Fetch standard's `*` covers every
/// header but that one, so a browser that follows it (Firefox) would refuse a page's call
/// with a token.
const ANY_HEADER: HeaderValue = HeaderValue::from_static("*, authorization");
const VARY: HeaderValue = HeaderValue::from_static(
    "origin, access-control-request-method, access-control-request-headers",
);

/// Who may read the answer to a request.
#[derive(Clone)]
pub enum Reader {
    /// A page of any origin (`CORS_ORIGINS` unset).
    AnyOrigin,
    /// A page of this origin, which `CORS_ORIGINS` lists.
    Listed(HeaderValue),
    /// No other origin's page: the request is the API's own page's (served at an address),
    /// or no browser's.
    Own,
}

/// Who may read the answer to `request`, given the origins `listed` (`None`: any); `None`
/// when it comes from the page of an origin not listed.
pub fn reader(listed: Option<&[String]>, request: &Request) -> Option<Reader> {
    let Some(listed) = listed else {
        return Some(Reader::AnyOrigin);
    };
    let headers = request.headers();
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Some(Reader::Own);
    };
    if listed
        .iter()
        .any(|allowed| allowed.as_bytes() == origin.as_bytes())
    {
        return Some(Reader::Listed(origin.clone()));
    }
    // The page at `/` sends its `Origin` on a POST too. It is taken for its own origin's
    // unlisted only when served at an address: a name can be made to point here by another
    // site (DNS rebinding), whose page then has an `Origin` matching `Host`, and even
    // `Sec-Fetch-Site: same-origin`. Under a name, the page's origin is to be listed.
    let own = headers.get(header::HOST).is_some_and(|host| {
        let origin = origin.as_bytes();
        let authority = origin
            .strip_prefix(b"https://")
            .or_else(|| origin.strip_prefix(b"http://"));
        authority.is_some_and(|authority| authority.eq_ignore_ascii_case(host.as_bytes()))
            && std::str::from_utf8(host.as_bytes()).is_ok_and(is_an_address)
    });
    own.then_some(Reader::Own)
}

/// Whether a `Host` names this machine by an address (or `localhost`), not by a name.
fn is_an_address(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// A CORS preflight: OPTIONS with `Origin` and `Access-Control-Request-Method`. (Any other
/// OPTIONS is answered like any method without a handler.)
pub fn is_preflight(request: &Request) -> bool {
    let headers = request.headers();
    request.method() == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a preflight of a page `reader` allows: allowed, whatever it asks.
pub fn preflight_answer(reader: &Reader) -> Response {
    let mut response = Response::new(Body::empty());
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, ANY);
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, ANY_HEADER);
    allow_origin(headers, reader);
    response
}

/// Lets the page `reader` names read `response` and all its headers.
pub fn allow(response: &mut Response, reader: &Reader) {
    let headers = response.headers_mut();
    if allow_origin(headers, reader) {
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, ANY);
    }
}

/// Names the origin `reader` allows in `headers`; `false` when it is the API's own.
fn allow_origin(headers: &mut HeaderMap, reader: &Reader) -> bool {
    // `Vary` may have values of its own already: add to them, do not replace them. (With
    // `CORS_ORIGINS` an answer to the API's own page differs from a listed origin's too.)
    headers.append(header::VARY, VARY);
    let origin = match reader {
        Reader::AnyOrigin => ANY,
        Reader::Listed(origin) => origin.clone(),
        Reader::Own => return false,
    };
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    true
}
