//! Reading answers: the first choice's text and tool calls, the usage however it is
//! written, and what the other choices hold.

use super::*;

#[test]
fn a_whole_answer_is_read_for_its_first_choice_and_usage() {
    let body = r#"{"choices":[
        {"index":1,"message":{"role":"assistant","content":"second"}},
        {"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}],
        "usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8,"prompt_tokens_details":{"cached_tokens":1}}}"#;
    let read = read_completion(body).unwrap();
    assert_eq!(read.text, "");
    assert!(read.tool_calls.unwrap().starts_with(r#"[{"id":"c""#));
    assert_eq!(
        read.usage,
        Some(Usage {
            prompt_tokens: 3,
            completion_tokens: Some(5),
            cached_tokens: 1
        })
    );
}

#[test]
fn an_answer_with_nothing_in_it_is_unusable() {
    for body in [
        r#"{"choices":[]}"#,
        r#"{"choices":[{"message":{"content":" \n "}}]}"#,
        r#"{"choices":[{"message":{"content":null,"tool_calls":[]}}]}"#,
        "not json",
    ] {
        assert!(read_completion(body).is_err(), "{body}");
    }
    let refusal = r#"{"choices":[{"message":{"content":null,"refusal":"no"}}],"usage":null}"#;
    assert_eq!(read_completion(refusal).unwrap().usage, None);
}

#[test]
fn a_chunk_yields_its_text_tool_calls_usage_and_whether_it_holds_anything() {
    let read = |data: &str| read_chunk(data.to_string()).unwrap();
    let text = read(r#"{"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#);
    assert_eq!((text.text.as_str(), text.substantial), ("Hel", true));
    let role = read(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#);
    assert!(!role.substantial);
    let blank = read(r#"{"choices":[{"index":0,"delta":{"content":"  "}}]}"#);
    assert_eq!((blank.text.as_str(), blank.substantial), ("  ", false));
    let other = read(r#"{"choices":[{"index":1,"delta":{"content":"x"}}]}"#);
    assert_eq!((other.text.as_str(), other.substantial), ("", true));
    let call = read(
        r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a"}}]}}]}"#,
    );
    assert!(call.substantial);
    assert_eq!(
        call.tool_calls[0]
            .function
            .as_ref()
            .unwrap()
            .arguments
            .as_deref(),
        Some("{\"a")
    );
    let usage = read(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#);
    assert_eq!(
        usage.usage.map(|usage| usage.completion_tokens),
        Some(Some(5))
    );
    assert!(matches!(
        read_chunk(r#"{"error":{"message":"overloaded"}}"#.into()),
        Err(LlmError::BrokeOff)
    ));
    assert!(read_chunk("not json".into()).is_err());
}

#[test]
fn streamed_tool_calls_are_assembled_from_their_pieces() {
    let piece = |index, id: Option<&str>, name: Option<&str>, arguments: &str| ToolCallDelta {
        index: Some(index),
        id: id.map(str::to_string),
        kind: id.map(|_| "function".to_string()),
        function: Some(FunctionDelta {
            name: name.map(str::to_string),
            arguments: Some(arguments.to_string()),
        }),
    };
    let mut calls = ToolCalls::default();
    assert_eq!(calls.to_json(), None);
    calls.add(&[piece(0, Some("a"), Some("weather"), "")]);
    calls.add(&[piece(0, None, None, "{\"city\":")]);
    calls.add(&[piece(1, Some("b"), Some("time"), "{}")]);
    calls.add(&[piece(0, None, None, "\"Paris\"}")]);
    let json: serde_json::Value = serde_json::from_str(&calls.to_json().unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            {"id": "a", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "b", "type": "function", "function": {"name": "time", "arguments": "{}"}},
        ])
    );
}

#[test]
fn a_usage_is_read_however_its_numbers_are_written_and_never_costs_the_answer() {
    let usage_of = |usage: &str| {
        let body = format!(r#"{{"choices":[{{"message":{{"content":"hi"}}}}],"usage":{usage}}}"#);
        read_completion(&body).expect(usage).usage
    };
    let reported = |prompt, completion, cached| {
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
        })
    };
    assert_eq!(
        usage_of(r#"{"prompt_tokens":30.0,"completion_tokens":12.5}"#),
        reported(30, Some(13), 0)
    );
    assert_eq!(
        usage_of(r#"{"prompt_tokens":1e18,"completion_tokens":18446744073709551616}"#),
        reported(1_000_000_000_000_000_000, Some(i64::MAX), 0)
    );
    assert_eq!(
        usage_of(r#"{"prompt_tokens":1e309,"completion_tokens":-0}"#),
        reported(i64::MAX, Some(0), 0)
    );
    // A negative count is no count: a broken upstream's answer is counted, not free.
    assert_eq!(
        usage_of(r#"{"prompt_tokens":7,"completion_tokens":-4}"#),
        reported(7, None, 0)
    );
    for negative in ["-1000", "-0.5", "-1e30", "-99999999999999999999"] {
        let usage = format!(r#"{{"prompt_tokens":{negative},"completion_tokens":3}}"#);
        assert_eq!(usage_of(&usage), None, "{usage}");
    }
    assert_eq!(
        usage_of(
            r#"{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":-2}}"#
        ),
        reported(5, Some(1), 0)
    );
    // Not numbers: as if absent. No prompt count is no usage; no answer count, counted.
    assert_eq!(
        usage_of(r#"{"prompt_tokens":"30","completion_tokens":7}"#),
        None
    );
    // Not an object, or one that cannot be read: no usage, and the answer kept.
    for usage in [
        r#""lots""#,
        "5",
        "[1,2]",
        r#"{"prompt_tokens":3,"prompt_tokens":4,"completion_tokens":1}"#,
        r#"{"prompt_tokens":3,"completion_tokens":1,"prompt_tokens_details":"x"}"#,
    ] {
        assert_eq!(usage_of(usage), None, "{usage}");
    }
    assert_eq!(
        usage_of(r#"{"prompt_tokens":30,"completion_tokens":null}"#),
        reported(30, None, 0)
    );
    assert_eq!(
        usage_of(
            r#"{"prompt_tokens":30,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":"0"}}"#
        ),
        reported(30, Some(7), 0)
    );
    let chunk =
        read_chunk(r#"{"choices":[],"usage":{"prompt_tokens":3.5,"completion_tokens":{}}}"#.into());
    assert_eq!(chunk.unwrap().usage, reported(4, None, 0));
}

#[test]
fn what_a_chat_does_not_store_is_read_for_counting_whole_and_streamed() {
    let body = r#"{"choices":[
        {"index":1,"message":{"content":"second","tool_calls":[{"id":"c","function":{"name":"f","arguments":"{}"}}]}},
        {"index":0,"message":{"content":"first","refusal":"but"}},
        {"index":2,"message":{"content":null,"refusal":"no"}}]}"#;
    let read = read_completion(body).unwrap();
    assert_eq!(read.text, "first");
    // The first choice's refusal; the others' text, refusals and tool calls' names and
    // arguments (not their ids), as a stream's pieces are counted.
    assert_eq!(read.unstored, "secondf{}butno");
    let chunk = read_chunk(
        r#"{"choices":[{"index":0,"delta":{"content":"a","refusal":"r"}},{"index":1,"delta":{"content":"b",
            "tool_calls":[{"index":0,"id":"c","function":{"name":"g","arguments":"{\"x\""}}]}}]}"#
            .into(),
    )
    .unwrap();
    assert_eq!(
        (chunk.text.as_str(), chunk.unstored.as_str()),
        ("a", r#"rbg{"x""#)
    );
}

#[test]
fn a_legacy_function_call_and_an_audio_transcript_are_read_for_counting_whole_and_streamed() {
    let body = r#"{"choices":[
        {"index":0,"message":{"content":null,"function_call":{"name":"lookup","arguments":"{\"q\":1}"}}},
        {"index":1,"message":{"content":null,"audio":{"id":"a","data":"UklGRg==","transcript":"hello there"}}}]}"#;
    let read = read_completion(body).unwrap();
    assert_eq!(read.text, "");
    assert_eq!(read.unstored, r#"lookup{"q":1}hello there"#);
    let chunk = read_chunk(
        r#"{"choices":[{"index":0,"delta":{"function_call":{"arguments":"{\"q\""}}},
            {"index":1,"delta":{"audio":{"data":"AAAA","transcript":" there"}}}]}"#
            .into(),
    )
    .unwrap();
    assert!(chunk.substantial);
    assert_eq!(
        (chunk.text.as_str(), chunk.unstored.as_str()),
        ("", r#"{"q" there"#)
    );
}

#[test]
fn a_piece_with_a_new_id_or_without_an_index_is_assembled_as_the_server_meant_it() {
    let piece = |index: Option<usize>, id: Option<&str>, name: Option<&str>, arguments: &str| {
        ToolCallDelta {
            index,
            id: id.map(str::to_string),
            kind: None,
            function: Some(FunctionDelta {
                name: name.map(str::to_string),
                arguments: Some(arguments.to_string()),
            }),
        }
    };
    let assembled = |calls: &ToolCalls| -> Vec<(String, String, String)> {
        let json: serde_json::Value = serde_json::from_str(&calls.to_json().unwrap()).unwrap();
        json.as_array()
            .unwrap()
            .iter()
            .map(|call| {
                let text = |value: &serde_json::Value| value.as_str().unwrap().to_string();
                let function = &call["function"];
                (
                    text(&call["id"]),
                    text(&function["name"]),
                    text(&function["arguments"]),
                )
            })
            .collect()
    };
    let call = |id: &str, name: &str, arguments: &str| {
        (id.to_string(), name.to_string(), arguments.to_string())
    };
    // Gemini's: each call whole, its own id, no index; then a piece of the last.
    let mut gemini = ToolCalls::default();
    gemini.add(&[piece(
        None,
        Some("c1"),
        Some("weather"),
        "{\"city\":\"Sydney\"}",
    )]);
    gemini.add(&[piece(None, Some("c2"), Some("time"), "{\"tz\":")]);
    gemini.add(&[piece(None, None, None, "\"AEST\"}")]);
    assert_eq!(
        assembled(&gemini),
        [
            call("c1", "weather", r#"{"city":"Sydney"}"#),
            call("c2", "time", r#"{"tz":"AEST"}"#)
        ]
    );
    // Two calls at index 0, told apart by their ids; an id repeated in every piece is one.
    let mut same_index = ToolCalls::default();
    same_index.add(&[piece(Some(0), Some("a"), Some("f"), "{")]);
    same_index.add(&[piece(Some(0), Some("a"), None, "}")]);
    same_index.add(&[piece(Some(0), Some("b"), Some("g"), "[]")]);
    same_index.add(&[piece(Some(0), None, None, "!")]);
    assert_eq!(
        assembled(&same_index),
        [call("a", "f", "{}"), call("b", "g", "[]!")]
    );
}

#[test]
fn tool_calls_are_counted_by_their_names_and_arguments_not_their_json() {
    let calls = r#"[{"id":"call_1","type":"function","function":{"name":"say","arguments":"{\"text\":\"caf\u00e9 \\\"quoted\\\"\"}"}},
                    {"id":"call_2","type":"function","function":{"name":"t","arguments":"{}"}}]"#;
    assert_eq!(tool_call_text(calls), r#"say{"text":"café \"quoted\""}t{}"#);
    assert_eq!(tool_call_text("null"), "");
    assert_eq!(tool_call_text("[]"), "");
    // Read as far as it can be; the rest counted as written, never left out.
    let odd = r#"[{"id":7,"function":{"name":"f","arguments":{"x":1}}},{"type":"custom","custom":{"input":"hi"}}]"#;
    assert_eq!(tool_call_text(odd), r#"f{"x":1}hi"#);
}

#[test]
fn a_streamed_call_of_another_kind_or_written_oddly_is_counted_not_lost() {
    let chunk = read_chunk(
        r#"{"choices":[{"index":0,"delta":{"tool_calls":[
            {"index":0,"id":"c","type":"custom","custom":{"name":"sh","input":"ls -l"}},
            {"index":1,"id":7,"type":"function","function":{"name":"f","arguments":{"x":1}}}]}}]}"#
            .into(),
    )
    .unwrap();
    assert!(chunk.substantial);
    assert!(chunk.tool_calls.is_empty(), "{chunk:?}");
    assert_eq!(chunk.unstored, r#"shls -lf{"x":1}"#);
    // A whole answer's custom call: its name and input too.
    let calls = r#"[{"id":"c","type":"custom","custom":{"name":"sh","input":"ls -l"}}]"#;
    assert_eq!(tool_call_text(calls), "shls -l");
}
