//! `GET /v1/models` and `GET /v1/models/{model}`: the models served, as OpenAI lists and
//! retrieves them, a key seeing only those it may ask for.

use axum::http::StatusCode;
use serde_json::json;

use super::{assert_openai_error, key_of};
use crate::common::TestApp;

#[tokio::test]
async fn the_models_served_are_listed_as_openai_lists_them() {
    let app = TestApp::with_env(&[(
        "LLM_MODELS",
        "big-model, small-model,big-model,meta-llama/Llama-3.1-8B",
    )])
    .await;
    let key = key_of(&app, "user").await;
    let listed = app.get_authorized("/v1/models", &key).await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.json["object"], "list");
    let ids: Vec<&str> = listed.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|model| {
            assert_eq!(model["object"], "model");
            assert_eq!(model["owned_by"], "tokenchat");
            assert!(model["created"].is_i64());
            model["id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        ids,
        [
            "llama3.2",
            "big-model",
            "small-model",
            "meta-llama/Llama-3.1-8B"
        ]
    );
    // One of them, as OpenAI's "retrieve model" gives it: the list's own item.
    for path in ["/v1/models/small-model", "/v1/models/small-model/"] {
        let one = app.get_authorized(path, &key).await;
        assert_eq!(one.status, StatusCode::OK, "{one:?}");
        assert_eq!(one.json, listed.json["data"][2]);
    }
    // A name holding `/`, written as the SDKs send it or escaped.
    for path in [
        "/v1/models/meta-llama/Llama-3.1-8B",
        "/v1/models/meta-llama/Llama-3.1-8B/",
        "/v1/models/meta-llama%2FLlama-3.1-8B",
    ] {
        let one = app.get_authorized(path, &key).await;
        assert_eq!(one.status, StatusCode::OK, "{path}: {one:?}");
        assert_eq!(one.json, listed.json["data"][3]);
    }
    // The list keeps its one trailing slash; a part of a name is no model.
    let slashed = app.get_authorized("/v1/models/", &key).await;
    assert_eq!(slashed.json, listed.json, "{slashed:?}");
    for unknown in [
        "/v1/models/no-such-model",
        "/v1/models/%FF",
        "/v1/models/meta-llama",
        "/v1/models/meta-llama/",
        "/v1/models/small-model//",
    ] {
        let missing = app.get_authorized(unknown, &key).await;
        assert_openai_error(
            &missing,
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
        );
    }
    // A key limited to some models sees only those, listed or retrieved.
    let token = app.user_with_token("owner").await;
    let limited = app
        .post_authorized(
            "/keys",
            &token,
            json!({ "name": "k", "models": ["big-model"] }),
        )
        .await
        .json["key"]
        .as_str()
        .unwrap()
        .to_string();
    let hidden = app.get_authorized("/v1/models/small-model", &limited).await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND, "{hidden:?}");
    let shown = app.get_authorized("/v1/models/big-model", &limited).await;
    assert_eq!(shown.json["id"], "big-model", "{shown:?}");
    let refused = app.get_authorized("/v1/models", "tc_nonsense").await;
    assert_openai_error(
        &refused,
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_api_key",
    );
}
