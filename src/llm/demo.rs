//! The built-in `demo` model, used when `LLM_BASE_URL` is empty: the original system's own
//! "AI", a fixed table of hello-world programs, so a fresh machine can chat with nothing
//! else installed.

use std::time::Duration;

use futures_util::{future::BoxFuture, FutureExt, StreamExt};

use super::{
    AnswerStream, Ask, Backend, Completion, LlmError, ModelProbe, Piece, PromptMessage, Role,
};

/// How long the demo model takes per word, so that it streams as a model would.
const DEMO_WORD_DELAY: Duration = Duration::from_millis(15);

/// The demo model as a backend: answers at once, streams word by word, reaches nothing.
pub(super) struct Demo;

impl Backend for Demo {
    fn complete<'a>(&'a self, ask: &'a Ask<'a>) -> BoxFuture<'a, Result<Completion, LlmError>> {
        let completion = Completion {
            content: answer(last_user_message(ask.messages)),
            usage: None,
        };
        futures_util::future::ready(Ok(completion)).boxed()
    }

    fn stream<'a>(&'a self, ask: &'a Ask<'a>) -> BoxFuture<'a, Result<AnswerStream, LlmError>> {
        let stream = demo_stream(answer(last_user_message(ask.messages)));
        futures_util::future::ready(Ok(stream)).boxed()
    }

    fn probe(&self) -> BoxFuture<'_, ModelProbe> {
        futures_util::future::ready(ModelProbe::BuiltIn).boxed()
    }

    fn default_model(&self) -> &str {
        MODEL_NAME
    }

    fn shown_url(&self) -> Option<&str> {
        None
    }
}

/// The demo model's answer, a word at a time.
fn demo_stream(answer: String) -> AnswerStream {
    let words = pieces(&answer);
    Box::pin(futures_util::stream::iter(words).then(|word| async move {
        tokio::time::sleep(DEMO_WORD_DELAY).await;
        Ok(Piece::Text(word))
    }))
}

fn last_user_message<'a>(turns: &[PromptMessage<'a>]) -> &'a str {
    turns
        .iter()
        .rev()
        .find(|turn| turn.role == Role::User)
        .map_or("", |turn| turn.content)
}

/// The name the demo model is served under.
pub const MODEL_NAME: &str = "demo";

/// The languages the original knew, in the order it checked them.
const PROGRAMS: [(&str, &str); 5] = [
    ("python", "print(\"Hello, World!\")"),
    (
        "c++",
        "#include <iostream>\n\nint main() {\n    std::cout << \"Hello, World!\" << std::endl;\n    return 0;\n}",
    ),
    (
        "java",
        "public class HelloWorld {\n    public static void main(String[] args) {\n        System.out.println(\"Hello, World!\");\n    }\n}",
    ),
    (
        "c",
        "#include <stdio.h>\n\nint main(void) {\n    printf(\"Hello, World!\\n\");\n    return 0;\n}",
    ),
    (
        "go",
        "package main\n\nimport \"fmt\"\n\nfunc main() {\n    fmt.Println(\"Hello, World!\")\n}",
    ),
];

const SORRY: &str = "Sorry, I could not generate 'Hello World' for your requested language.";

const ABOUT: &str = "(This is tokenchat's built-in demo model: it knows hello-world programs in \
    Python, C++, Java, C and Go. Set LLM_BASE_URL to an OpenAI-compatible API, for example \
    a local Ollama's http://127.0.0.1:11434/v1, to chat with a real model.)";

/// The demo model's answer to `message`: the program for the first language it names, as a
/// whole word in any letter case (so "go" is not found in "code", as the original's
/// substring match found "c" there); otherwise the original's apology and a sentence on
/// what this model is.
pub fn answer(message: &str) -> String {
    let lowered = message.to_lowercase();
    let words: Vec<&str> = lowered
        .split(|c: char| !(c.is_alphanumeric() || c == '+'))
        .filter(|word| !word.is_empty())
        .collect();
    PROGRAMS
        .iter()
        .find(|(language, _)| words.contains(language))
        .map(|(language, program)| {
            let shown = match *language {
                "c++" => "C++",
                "c" => "C",
                "go" => "Go",
                "java" => "Java",
                _ => "Python",
            };
            format!("Code for 'Hello World' in {shown}:\n\n{program}")
        })
        .unwrap_or_else(|| format!("{SORRY} {ABOUT}"))
}

/// `text` in the pieces a model would stream it in: each word with the white space after it,
/// so the pieces joined are `text` again.
pub fn pieces(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    let mut in_space = false;
    for c in text.chars() {
        if !c.is_whitespace() && in_space {
            pieces.push(std::mem::take(&mut current));
        }
        in_space = c.is_whitespace();
        current.push(c);
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_language_of_the_original_gets_its_program() {
        for (message, language, marker) in [
            (
                "code hello world in python",
                "Python",
                "print(\"Hello, World!\")",
            ),
            ("Hello world in C++ please", "C++", "std::cout"),
            ("java", "Java", "System.out.println"),
            ("write it in c", "C", "printf"),
            ("code hello world in go", "Go", "fmt.Println"),
        ] {
            let answer = answer(message);
            assert!(
                answer.starts_with(&format!("Code for 'Hello World' in {language}:")),
                "{message}: {answer}"
            );
            assert!(answer.contains(marker), "{message}: {answer}");
        }
    }

    #[test]
    fn languages_are_whole_words_checked_in_the_original_order() {
        // "code" holds "c" and "go" holds nothing else: whole words only.
        assert!(answer("code hello world").starts_with(SORRY));
        assert!(answer("golang or cobol?").starts_with(SORRY));
        // Both named: python comes first in the original's table.
        assert!(answer("go or python").contains("in Python:"));
    }

    #[test]
    fn anything_else_gets_the_apology_and_how_to_use_a_real_model() {
        let answer = answer("What is the capital of France?");
        assert!(answer.starts_with(SORRY));
        assert!(answer.contains("built-in demo model"));
        assert!(answer.contains("LLM_BASE_URL"));
    }

    #[test]
    fn the_pieces_of_an_answer_join_to_the_answer() {
        for text in [
            "",
            "one",
            "two words",
            "  lead\n\nand trail  ",
            &answer("python"),
        ] {
            assert_eq!(pieces(text).concat(), text);
        }
        assert_eq!(pieces("a b  c"), ["a ", "b  ", "c"]);
    }
}
