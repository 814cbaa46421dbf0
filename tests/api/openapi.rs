//! `GET /openapi.json`: an OpenAPI 3.1 document that lists every route the router serves,
//! with every method, whose described answers have the fields the real answers have, and
//! that a real validator (`openapi-spec-validator`, in CI's Python) accepts.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::TestApp;

const METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

#[tokio::test]
async fn every_route_and_method_the_router_serves_is_in_the_openapi_document_and_no_other() {
    let app = TestApp::new().await;
    let served = app.request(Method::GET, "/openapi.json", &[], "").await;
    assert_eq!(served.status, 200);
    let document = served.json;
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(
        document,
        serde_json::to_value(tokenchat::openapi_document()).unwrap()
    );
    // With its trailing slash too, as every route.
    let slashed = app.request(Method::GET, "/openapi.json/", &[], "").await;
    assert_eq!(slashed.json, document);
    let documented = document["paths"].as_object().unwrap();
    let paths = tokenchat::api_paths(&app.state);
    assert!(paths.len() >= 19, "{paths:?}");
    // OpenAPI has no wildcard: the router's `{*model}` (the rest of the path) is `{model}`.
    let paths: Vec<String> = paths.iter().map(|path| path.replace("{*", "{")).collect();
    for path in &paths {
        let concrete = path.replace("{id}", "1");
        for method in METHODS {
            // No token: a routed method answers (401, 400, 200...); one that is not, 405.
            let (status, _, _) = app
                .request_raw(
                    method.clone(),
                    &concrete,
                    &[("content-type", "application/json")],
                    "{}",
                )
                .await;
            assert_ne!(status, StatusCode::NOT_FOUND, "{method} {concrete}");
            let routed = status != StatusCode::METHOD_NOT_ALLOWED;
            let operation = &documented
                .get(path)
                .unwrap_or_else(|| panic!("{path} is not in the document"))
                [method.as_str().to_ascii_lowercase()];
            assert_eq!(
                routed,
                operation.is_object(),
                "{method} {path}: routed {routed}, documented {}",
                operation.is_object()
            );
            if routed {
                assert!(operation["responses"].is_object(), "{method} {path}");
            }
        }
    }
    for documented_path in documented.keys() {
        assert!(
            paths.contains(documented_path),
            "{documented_path} is documented but not routed"
        );
    }
    for scheme in ["bearer", "token", "metrics_token"] {
        assert!(
            document["components"]["securitySchemes"][scheme].is_object(),
            "{scheme}"
        );
    }
}

/// The property names of the schema of `path`'s `method` answer with `status`.
fn described_fields(document: &Value, path: &str, method: &str, status: &str) -> Vec<String> {
    let schema = &document["paths"][path][method]["responses"][status]["content"]
        ["application/json"]["schema"];
    let name = schema["$ref"]
        .as_str()
        .unwrap_or_else(|| panic!("{method} {path} {status}: {schema}"))
        .rsplit('/')
        .next()
        .unwrap();
    let properties = document["components"]["schemas"][name]["properties"]
        .as_object()
        .unwrap();
    let mut fields: Vec<String> = properties.keys().cloned().collect();
    fields.sort();
    fields
}

fn fields_of(body: &Value) -> Vec<String> {
    let mut fields: Vec<String> = body.as_object().unwrap().keys().cloned().collect();
    fields.sort();
    fields
}

#[tokio::test]
async fn the_documented_answers_have_the_fields_of_the_real_ones() {
    let app = TestApp::new().await;
    let document = serde_json::to_value(tokenchat::openapi_document()).unwrap();
    let registered = app.register("user", "pass123").await;
    let login = app.login("user", "pass123").await;
    let token = login.json["token"].as_str().unwrap().to_string();
    let chat = app.chat(&token, "hello").await;
    let balance = app.get_authorized("/balance", &token).await;
    let chats = app.get_authorized("/chats", &token).await;
    let one = app
        .get_authorized(&format!("/chats/{}", chat.json["chat_id"]), &token)
        .await;
    let transactions = app.get_authorized("/transactions", &token).await;
    let conversations = app.get_authorized("/conversations", &token).await;
    let wrong = app
        .post_json(
            "/login",
            json!({ "username": "user", "password": "wrong-one" }),
        )
        .await;
    for (path, method, status, body) in [
        ("/register", "post", "201", &registered.json),
        ("/login", "post", "200", &login.json),
        ("/chat", "post", "200", &chat.json),
        ("/balance", "get", "200", &balance.json),
        ("/chats", "get", "200", &chats.json),
        ("/chats/{id}", "get", "200", &one.json),
        ("/transactions", "get", "200", &transactions.json),
        ("/conversations", "get", "200", &conversations.json),
    ] {
        assert_eq!(
            described_fields(&document, path, method, status),
            fields_of(body),
            "{method} {path}"
        );
    }
    for (list, record_path) in [
        (&chats.json["chats"][0], "/chats/{id}"),
        (&one.json, "/chats/{id}"),
    ] {
        assert_eq!(
            described_fields(&document, record_path, "get", "200"),
            fields_of(list)
        );
    }
    // The error envelope describes every field an error has (and some it may have).
    let envelope = described_fields(&document, "/login", "post", "401");
    for field in fields_of(&wrong.json) {
        assert!(envelope.contains(&field), "{field}");
    }
}

#[tokio::test]
async fn a_real_openapi_validator_accepts_the_document() {
    let Ok(python) = std::env::var("TOKENCHAT_SDK_PYTHON") else {
        println!("OpenAPI validation skipped: set TOKENCHAT_SDK_PYTHON (CI does)");
        return;
    };
    let document = serde_json::to_string(&tokenchat::openapi_document()).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), document).unwrap();
    let checked = std::process::Command::new(python)
        .args([
            "-c",
            "import json, sys\n\
             from openapi_spec_validator import validate\n\
             document = json.load(open(sys.argv[1]))\n\
             validate(document)\n\
             print('valid', document['openapi'])",
        ])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(checked.status.success(), "{checked:?}");
    assert_eq!(
        String::from_utf8_lossy(&checked.stdout).trim(),
        "valid 3.1.0"
    );
}

/// Whether the document lists `status` among the answers of `method` on `path`.
fn lists(document: &Value, path: &str, method: &str, status: u16) -> bool {
    document["paths"][path][method]["responses"]
        .get(status.to_string())
        .is_some()
}

#[tokio::test]
async fn each_status_a_route_really_answers_is_one_the_document_lists_for_it() {
    let app = TestApp::new().await;
    let document = app
        .request(Method::GET, "/openapi.json", &[], "")
        .await
        .json;
    let token = app.user_with_token("user").await;
    let key = app
        .post_authorized("/keys", &token, json!({ "name": "agent", "rpm": 1 }))
        .await
        .json["key"]
        .as_str()
        .unwrap()
        .to_string();
    let chat = |body: Value| app.post_authorized("/chat", &token, body);
    let mut seen = vec![
        (
            "/chat",
            "post",
            chat(json!({ "message": "hi", "conversation_id": 999_999 })).await,
        ),
        (
            "/conversations/{id}",
            "get",
            app.get_authorized("/conversations/1?limit=0", &token).await,
        ),
    ];
    app.llm.set_reply(crate::common::Reply::Reject(422));
    let embeddings = app
        .request(
            Method::POST,
            "/v1/embeddings",
            &[("authorization", &format!("Bearer {key}"))],
            json!({ "model": "llama3.2", "input": "hi" }).to_string(),
        )
        .await;
    seen.push(("/v1/embeddings", "post", embeddings));
    app.llm.set_reply(crate::common::Reply::Busy {
        status: 429,
        retry_after: Some("1"),
    });
    seen.push(("/chat", "post", chat(json!({ "message": "hi" })).await));
    // The key's one request a minute is spent: every route it calls is 429.
    seen.push((
        "/balance",
        "get",
        app.get_authorized("/balance", &key).await,
    ));
    seen.push((
        "/v1/models",
        "get",
        app.get_authorized("/v1/models", &key).await,
    ));
    let statuses: Vec<u16> = seen
        .iter()
        .map(|(_, _, answer)| answer.status.as_u16())
        .collect();
    assert_eq!(statuses, [404, 400, 422, 503, 429, 429]);
    for (path, method, answer) in &seen {
        assert!(
            lists(&document, path, method, answer.status.as_u16()),
            "{method} {path} answered {} undocumented: {answer:?}",
            answer.status
        );
    }
    // Each route that hashes a password may find the hashing queue full.
    for path in ["/register", "/login", "/password"] {
        assert!(lists(&document, path, "post", 503), "{path}");
    }
    // A stream is a 200 of its own media type.
    for (path, schema) in [
        ("/chat", "ChatAnswer"),
        ("/v1/chat/completions", "Completion"),
    ] {
        let content = &document["paths"][path]["post"]["responses"]["200"]["content"];
        assert_eq!(
            content["application/json"]["schema"]["$ref"],
            format!("#/components/schemas/{schema}")
        );
        assert!(
            content.get("text/event-stream").is_some(),
            "{path}: {content}"
        );
    }
    // The embeddings input is a string or arrays, not an object; a page 1 to 100.
    let input = &document["components"]["schemas"]["EmbeddingRequest"]["properties"]["input"];
    assert_eq!(input["oneOf"][0]["type"], "string", "{input}");
    let limit = document["paths"]["/chats"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|parameter| parameter["name"] == "limit")
        .unwrap()
        .clone();
    assert_eq!(
        (&limit["schema"]["minimum"], &limit["schema"]["maximum"]),
        (&json!(1), &json!(100)),
        "{limit}"
    );
}
