//! The demo model's answers: the original system's table matched by whole words, and its
//! shapes as OpenAI's.

use super::*;

#[test]
fn each_language_of_the_original_gets_its_program() {
    for (message, language, marker) in [
        (
            "code hello world in python",
            "python",
            "print(\"Hello, World!\")",
        ),
        ("Hello world in C++ please", "c++", "std::cout"),
        ("java", "java", "System.out.println"),
        ("write it in c", "c", "printf"),
        ("code hello world in go", "go", "fmt.Println"),
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
    assert!(answer("go or python").contains("in python:"));
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
