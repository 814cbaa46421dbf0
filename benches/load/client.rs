//! The client side: requests, a target server with a user's token, HTTP/1.1 connections.

use std::{net::SocketAddr, sync::Arc};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    header::{AUTHORIZATION, CONTENT_TYPE, HOST},
    Method, Request, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

pub type MakeRequest = dyn Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync;

pub fn request(
    method: Method,
    path: &str,
    token: Option<&str>,
    body: String,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, "127.0.0.1")
        .header(CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Full::new(Bytes::from(body))).expect("request")
}

pub struct Target {
    pub addr: SocketAddr,
    pub token: String,
}

impl Target {
    pub fn get(&self, path: &'static str) -> Arc<MakeRequest> {
        let token = self.token.clone();
        Arc::new(move |_, _| request(Method::GET, path, Some(&token), String::new()))
    }

    pub fn post(&self, path: &'static str, body: String) -> Arc<MakeRequest> {
        let token = self.token.clone();
        Arc::new(move |_, _| request(Method::POST, path, Some(&token), body.clone()))
    }

    pub async fn register_and_login(&self, username: &str, password: &str) -> String {
        let credentials = json!({ "username": username, "password": password }).to_string();
        let (status, _) = send_once(
            self.addr,
            request(Method::POST, "/register", None, credentials),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "bench registration failed");
        self.login(username, password).await
    }

    pub async fn login(&self, username: &str, password: &str) -> String {
        let credentials = json!({ "username": username, "password": password }).to_string();
        let (_, login) = send_once(
            self.addr,
            request(Method::POST, "/login", None, credentials),
        )
        .await;
        login["token"].as_str().expect("a login token").to_string()
    }
}

pub async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    sender
}

pub async fn send_once(addr: SocketAddr, request: Request<Full<Bytes>>) -> (StatusCode, Value) {
    let mut sender = connect(addr).await;
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}
