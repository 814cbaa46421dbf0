//! CORS, as tower-http's `CorsLayer::permissive()` answered it: any origin, method and
//! header (`Authorization` named as well), every response header exposed, no credentials.
//!
//! Written here rather than taken from tower-http because its layer builds a header map and
//! joins its `Vary` value anew for every response: 12 of the 45 allocations a `GET /health`
//! still made once the other layers were concrete (BENCHMARKS.md, issue 23). These headers
//! are constants. Browsers may call the API from any origin: it authenticates by header,
//! never by cookie, so there are no ambient credentials for another site to use.

use axum::{
    body::Body,
    extract::Request,
    http::{header, HeaderValue, Method},
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

/// A CORS preflight: OPTIONS with `Origin` and `Access-Control-Request-Method`. (Any other
/// OPTIONS is answered like any method without a handler.)
pub fn is_preflight(request: &Request) -> bool {
    let headers = request.headers();
    request.method() == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a preflight: allowed, whatever it asks.
pub fn preflight_answer() -> Response {
    let mut response = Response::new(Body::empty());
    let headers = response.headers_mut();
    headers.append(header::VARY, VARY);
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, ANY);
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, ANY_HEADER);
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, ANY);
    response
}

/// Lets a page of any origin read `response` and all its headers.
pub fn allow_any_origin(response: &mut Response) {
    let headers = response.headers_mut();
    // `Vary` may have values of its own already: add to them, do not replace them.
    headers.append(header::VARY, VARY);
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, ANY);
    headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, ANY);
}
