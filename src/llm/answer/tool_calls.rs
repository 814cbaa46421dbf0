//! A streamed answer's tool calls, put together from their pieces as OpenAI's SDKs put them
//! together, for what a chat stores.

use serde::Serialize;

use super::ToolCallDelta;

/// The tool calls of a streamed answer, assembled from their pieces as OpenAI's SDKs
/// assemble them: by index, the first piece's id, type and name, the arguments joined. A
/// piece naming an id other than its call's starts a call of its own, and one without an
/// index adds to the last call: some servers send each call whole, with no index, or all
/// at index 0.
#[derive(Debug, Default)]
pub struct ToolCalls(Vec<(Option<usize>, ToolCall)>);

#[derive(Debug, Serialize)]
struct ToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    function: Function,
}

#[derive(Debug, Serialize)]
struct Function {
    name: String,
    arguments: String,
}

impl ToolCalls {
    pub fn add(&mut self, pieces: &[ToolCallDelta]) {
        for piece in pieces {
            let latest = match piece.index {
                Some(index) => self.0.iter().rposition(|(at, _)| *at == Some(index)),
                None => self.0.len().checked_sub(1),
            };
            let continued = latest.filter(|&slot| {
                let id = &self.0[slot].1.id;
                piece
                    .id
                    .as_ref()
                    .is_none_or(|named| id.is_empty() || id == named)
            });
            let slot = match continued {
                Some(slot) => slot,
                None => {
                    let call = ToolCall {
                        id: String::new(),
                        kind: "function".into(),
                        function: Function {
                            name: String::new(),
                            arguments: String::new(),
                        },
                    };
                    self.0.push((piece.index, call));
                    self.0.len() - 1
                }
            };
            let call = &mut self.0[slot].1;
            if let Some(id) = &piece.id {
                call.id.clone_from(id);
            }
            if let Some(kind) = &piece.kind {
                call.kind.clone_from(kind);
            }
            if let Some(function) = &piece.function {
                if let Some(name) = &function.name {
                    call.function.name.push_str(name);
                }
                if let Some(arguments) = &function.arguments {
                    call.function.arguments.push_str(arguments);
                }
            }
        }
    }

    /// The calls as the JSON array a whole answer would have held; `None` when there were
    /// none.
    pub fn to_json(&self) -> Option<String> {
        let calls: Vec<&ToolCall> = self.0.iter().map(|(_, call)| call).collect();
        (!calls.is_empty()).then(|| serde_json::to_string(&calls).unwrap_or_default())
    }
}
