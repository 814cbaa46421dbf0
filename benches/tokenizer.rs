//! `cargo bench --bench tokenizer`: how long tokenchat's tokenizer takes to count an
//! 8,000-character message (issue 25), by `tokenchat::pricing::Tokenizer` as a priced
//! `/chat` does: `O200kBase` and `Cl100kBase` (tiktoken-rs), and `Bytes` for reference.
//!
//! Each text is 8,000 characters: English prose (generated from a fixed word list, and the
//! start of this crate's README, prose with code), and adversarial ones: one letter 8,000
//! times, random lower-case letters without a space (each one piece for the byte-pair
//! merge), random code points from many scripts and emoji, and 8,000 spaces. Each encoding
//! is loaded and warmed first; then every text is counted `BENCH_ITERATIONS` times (default
//! 2,000) or for `BENCH_SECS` seconds (default 3) a text, whichever ends first, each call
//! timed alone. Printed: median, p99 and the largest call in milliseconds, and
//! `prompt_bound` of tokenchat's default system prompt with the English message. Pin it to
//! one core (`taskset -c 0`) for figures comparable with the server's.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use tokenchat::{config::DEFAULT_SYSTEM_PROMPT as SYSTEM_PROMPT, pricing::Tokenizer};

/// The message length the issue names, in characters.
const CHARS: usize = 8_000;

/// The words the English text is made of, common ones and a few of a chat about code.
const WORDS: &str = "\
    the of and to a in is it you that he was for on are with as I his they be at one \
    have this from or had by word but what some we can out other were all there when up \
    use your how said an each she which do their time if will way about many then them \
    write would like so these her long make thing see him two has look more day could go \
    come did number sound no most people my over know water than call first who may down \
    side been now find database transaction balance request answer question function \
    compile server because however explain whether unfortunately configuration \
    implementation 2026 42 3.14";

/// A small deterministic generator (xorshift64*), so every run counts the same texts.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The first `CHARS` characters of `text` (which must have as many).
fn truncated(text: &str) -> String {
    let text: String = text.chars().take(CHARS).collect();
    assert_eq!(text.chars().count(), CHARS, "a text of {CHARS} characters");
    text
}

/// Sentences of words from [`WORDS`], capitalised, with commas and full stops.
fn english(rng: &mut Rng) -> String {
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut text = String::new();
    while text.chars().count() < CHARS {
        let length = 6 + rng.below(14);
        for n in 0..length {
            let word = words[rng.below(words.len())];
            if n == 0 {
                let mut chars = word.chars();
                let first = chars.next().expect("a word");
                text.extend(first.to_uppercase());
                text.push_str(chars.as_str());
            } else {
                text.push(' ');
                text.push_str(word);
            }
            if n + 1 < length && rng.below(10) == 0 {
                text.push(',');
            }
        }
        text.push_str(if rng.below(8) == 0 { ".\n\n" } else { ". " });
    }
    truncated(&text)
}

/// The README from its start, repeated if it is short.
fn readme() -> String {
    truncated(&include_str!("../README.md").repeat(2))
}

fn random_letters(rng: &mut Rng) -> String {
    (0..CHARS)
        .map(|_| char::from(b'a' + rng.below(26) as u8))
        .collect()
}

/// Code points drawn from Latin-1, Greek, Cyrillic, Arabic, Devanagari, CJK, Hangul and
/// emoji, with no spaces.
fn random_unicode(rng: &mut Rng) -> String {
    const RANGES: &[(u32, u32)] = &[
        (0x00C0, 0x00FF),
        (0x0391, 0x03C9),
        (0x0410, 0x044F),
        (0x0627, 0x064A),
        (0x0905, 0x0939),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0x1F300, 0x1F64F),
    ];
    let mut text = String::new();
    while text.chars().count() < CHARS {
        let (low, high) = RANGES[rng.below(RANGES.len())];
        let code = low + rng.below((high - low + 1) as usize) as u32;
        if let Some(c) = char::from_u32(code) {
            text.push(c);
        }
    }
    text
}

/// Median, p99 and largest of `times`, in milliseconds.
fn quantiles(times: &mut [Duration]) -> (f64, f64, f64) {
    times.sort();
    let at = |q: f64| {
        let index = ((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1;
        times[index].as_secs_f64() * 1000.0
    };
    (at(0.5), at(0.99), at(1.0))
}

/// Times `call` alone, up to `iterations` times or for `budget`, at least 20 times.
fn time(iterations: usize, budget: Duration, mut call: impl FnMut() -> u64) -> Vec<Duration> {
    let mut times = Vec::with_capacity(iterations);
    let start = Instant::now();
    while times.len() < iterations && (times.len() < 20 || start.elapsed() < budget) {
        let began = Instant::now();
        black_box(call());
        times.push(began.elapsed());
    }
    times
}

fn main() {
    let from_env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(default)
    };
    let iterations = from_env("BENCH_ITERATIONS", 2000) as usize;
    let budget = Duration::from_secs(from_env("BENCH_SECS", 3));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let english = english(&mut rng);
    let texts: Vec<(&str, String)> = vec![
        ("English, generated", english.clone()),
        ("README.md (prose and code)", readme()),
        ("one letter ('a') 8,000 times", "a".repeat(CHARS)),
        ("random letters, no spaces", random_letters(&mut rng)),
        ("random code points, many scripts", random_unicode(&mut rng)),
        ("8,000 spaces", " ".repeat(CHARS)),
    ];
    let tokenizers = [
        Tokenizer::O200kBase,
        Tokenizer::Cl100kBase,
        Tokenizer::Bytes,
    ];
    for tokenizer in tokenizers {
        let began = Instant::now();
        tokenizer.load();
        let loaded = began.elapsed();
        // Warm up: caches, the regex's thread-local copy, the allocator.
        for _ in 0..50 {
            for (_, text) in &texts {
                black_box(tokenizer.count(black_box(text)));
            }
        }
        println!(
            "{}: loaded in {:.1} ms",
            tokenizer.as_str(),
            loaded.as_secs_f64() * 1000.0
        );
    }
    println!(
        "tokenizer benchmark: {CHARS}-character texts, up to {iterations} calls or {} s each",
        budget.as_secs()
    );
    println!();
    println!("| tokenizer | text | bytes | tokens | calls | median ms | p99 ms | max ms |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for tokenizer in tokenizers {
        for (name, text) in &texts {
            let tokens = tokenizer.count(text);
            let mut times = time(iterations, budget, || tokenizer.count(black_box(text)));
            let (median, p99, max) = quantiles(&mut times);
            println!(
                "| {} | {name} | {} | {tokens} | {} | {median:.4} | {p99:.4} | {max:.4} |",
                tokenizer.as_str(),
                text.len(),
                times.len(),
            );
        }
        // What a priced `/chat` counts: the system prompt and the message.
        let bound = tokenizer.prompt_bound([SYSTEM_PROMPT, english.as_str()]);
        let mut times = time(iterations, budget, || {
            tokenizer.prompt_bound(black_box([SYSTEM_PROMPT, english.as_str()]))
        });
        let (median, p99, max) = quantiles(&mut times);
        println!(
            "| {} | prompt_bound: system prompt + English, generated | {} | {bound} | {} | {median:.4} | {p99:.4} | {max:.4} |",
            tokenizer.as_str(),
            SYSTEM_PROMPT.len() + english.len(),
            times.len(),
        );
    }
}
