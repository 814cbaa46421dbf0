//! The configuration file: a price book with its defaults, upstreams and targets, and each
//! kind of mistake refused naming its file, line and field.

use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

const ALONE: Context<'static> = Context {
    lookup: &no_env,
    shorthand_upstream: false,
};

fn book_of(text: &str) -> PriceBook {
    parse("t.toml", text, &ALONE)
        .map(|file| file.price_book)
        .unwrap()
}

fn error(text: &str) -> String {
    parse("tokenchat.toml", text, &ALONE)
        .err()
        .unwrap()
        .to_string()
}

#[test]
fn a_book_is_read_with_its_defaults() {
    let book = book_of(
        "[models.\"gpt-4o-mini\"]\nprompt = 150\ncompletion = 600\nrequest = 1\nmax_output_tokens = 4096\n\n[models.local]\ncompletion = 400\n",
    );
    let mini = book.model("gpt-4o-mini").unwrap();
    assert_eq!(
        mini.prices,
        Prices {
            prompt: 150,
            cached_prompt: 150,
            completion: 600,
            request: 1,
            max_output_tokens: 4096
        }
    );
    assert_eq!(mini.tokenizer, Tokenizer::O200kBase);
    let local = book.model("local").unwrap();
    assert_eq!(local.prices.prompt, 0);
    assert_eq!(local.prices.max_output_tokens, DEFAULT_MAX_OUTPUT_TOKENS);
    assert_eq!(local.tokenizer, Tokenizer::Bytes);
    assert!(book.model("other").is_none());
    assert!(book_of("").is_empty());
}

#[test]
fn a_bad_file_is_refused_naming_its_file_line_and_field() {
    let bad_type = error("[models.a]\nprompt = 1\ncompletion = \"six\"\n");
    assert!(
        bad_type.starts_with("tokenchat.toml, line 3, field completion: "),
        "{bad_type}"
    );
    let negative = error("[models.a]\n\nprompt = -1\n");
    assert!(
        negative.starts_with("tokenchat.toml, line 3, field prompt: "),
        "{negative}"
    );
    let unknown = error("[models.a]\nprompt = 1\ncompletoin = 2\n");
    assert!(
        unknown.starts_with("tokenchat.toml, line 3, field completoin: "),
        "{unknown}"
    );
    let zero_cap = error("[models.a]\nprompt = 1\nmax_output_tokens = 0\n");
    assert!(
        zero_cap.starts_with("tokenchat.toml, line 3, field max_output_tokens: "),
        "{zero_cap}"
    );
    let tokenizer = error("[models.a]\nprompt = 1\ntokenizer = \"gpt2\"\n");
    assert!(
        tokenizer.starts_with("tokenchat.toml, line 3, field tokenizer: "),
        "{tokenizer}"
    );
    let unpriced = error("[models.a]\nmax_output_tokens = 10\n");
    assert!(
        unpriced.starts_with("tokenchat.toml, line 1, field models.\"a\": "),
        "{unpriced}"
    );
    let syntax = error("[models.a]\nprompt = = 1\n");
    assert!(syntax.starts_with("tokenchat.toml, line 2"), "{syntax}");
    let top = error("[prices]\nx = 1\n");
    assert!(top.contains("field prices"), "{top}");
}

const ROUTED: &str = r#"
[upstreams.primary]
base_url = "https://api.example.com/v1"
api_key_env = "PRIMARY_KEY"
timeout_secs = 20
headers = { "X-Title" = "tokenchat" }
max_concurrent = 8

[upstreams.local]
base_url = "http://127.0.0.1:11434/v1"

[models."llama3.2"]
completion = 400
targets = [
  { upstream = "primary", model = "meta-llama/llama-3.2-3b", weight = 3, priority = 0 },
  { upstream = "local", weight = 1, priority = 1 },
]
"#;

#[test]
fn upstreams_and_targets_are_read_with_the_key_from_its_variable() {
    let lookup = |name: &str| (name == "PRIMARY_KEY").then(|| "sk-primary".to_string());
    let context = Context {
        lookup: &lookup,
        shorthand_upstream: false,
    };
    let file = parse("t.toml", ROUTED, &context)
        .map_err(|err| err.to_string())
        .unwrap();
    assert_eq!(file.upstreams.len(), 2);
    let local = &file.upstreams[0];
    assert_eq!(
        (local.name.as_str(), local.api_key.is_none()),
        ("local", true)
    );
    let primary = &file.upstreams[1];
    assert_eq!(primary.name, "primary");
    assert_eq!(primary.timeout, Some(std::time::Duration::from_secs(20)));
    assert_eq!(primary.max_concurrent, Some(8));
    assert_eq!(primary.headers[0].0.as_str(), "x-title");
    use secrecy::ExposeSecret;
    assert_eq!(
        primary.api_key.as_ref().unwrap().expose_secret(),
        "sk-primary"
    );
    let targets = &file.targets["llama3.2"];
    assert_eq!(
        targets
            .iter()
            .map(|target| (
                target.upstream.as_str(),
                target.model.as_str(),
                target.weight,
                target.priority
            ))
            .collect::<Vec<_>>(),
        [
            ("primary", "meta-llama/llama-3.2-3b", 3, 0),
            ("local", "llama3.2", 1, 1)
        ]
    );
    assert_eq!(
        file.price_book.model("llama3.2").unwrap().prices.completion,
        400
    );
}

#[test]
fn a_bad_upstream_or_target_is_refused_naming_it() {
    let missing_key = error(ROUTED);
    assert!(
        missing_key.starts_with("tokenchat.toml, line 2, field upstreams.primary.api_key_env: the environment variable PRIMARY_KEY is not set"),
        "{missing_key}"
    );
    let unknown = error("[models.a]\ntargets = [{ upstream = \"nowhere\" }]\n");
    assert!(
        unknown.starts_with("tokenchat.toml, line 2, field models.\"a\".targets[0].upstream: no upstream is named \"nowhere\""),
        "{unknown}"
    );
    let untargeted = error("[upstreams.u]\nbase_url = \"http://127.0.0.1:1/v1\"\n[models.a]\ntargets = [{ upstream = \"u\" }]\n[models.b]\nprompt = 1\n");
    assert!(
        untargeted.starts_with("tokenchat.toml, line 5, field models.\"b\": has no targets"),
        "{untargeted}"
    );
    let credentials = error("[upstreams.u]\nbase_url = \"http://127.0.0.1:1/v1\"\nheaders = { Authorization = \"Bearer sk\" }\n");
    assert!(
        credentials.contains("field upstreams.u.headers: authorization is not set from the file")
            || credentials
                .contains("field upstreams.u.headers: Authorization is not set from the file"),
        "{credentials}"
    );
    assert!(!credentials.contains("Bearer sk"), "{credentials}");
    let url = error("[upstreams.u]\nbase_url = \"ftp://x\"\n");
    assert!(
        url.starts_with("tokenchat.toml, line 1, field upstreams.u.base_url: unsupported scheme"),
        "{url}"
    );
    let weight = error("[upstreams.u]\nbase_url = \"http://x/v1\"\n[models.a]\ntargets = [{ upstream = \"u\", weight = 0 }]\n");
    assert!(
        weight.contains("line 4") && weight.contains("weight"),
        "{weight}"
    );
    let unpriced_cap = error(
        "[upstreams.u]\nbase_url = \"http://x/v1\"\n[models.a]\ntargets = [{ upstream = \"u\" }]\nmax_output_tokens = 10\n",
    );
    assert!(
        unpriced_cap.contains("field models.\"a\".max_output_tokens: is used only with prices"),
        "{unpriced_cap}"
    );
    let empty = error("[models.a]\ntargets = []\n");
    assert!(
        empty.contains("field models.\"a\".targets: lists no target"),
        "{empty}"
    );
}

#[test]
fn a_key_written_where_its_variables_name_goes_or_in_a_header_is_refused_and_never_repeated() {
    let pasted = error(
        "[upstreams.u]\nbase_url = \"http://127.0.0.1:1/v1\"\napi_key_env = \"sk-pasted-secret\"\n",
    );
    assert!(
        pasted
            .contains("field upstreams.u.api_key_env: is not the name of an environment variable"),
        "{pasted}"
    );
    // A name that is no conventional one (a key of letters, digits and `_`) is not repeated.
    let keylike = error(
        "[upstreams.u]\nbase_url = \"http://127.0.0.1:1/v1\"\napi_key_env = \"gsk_pastedSecret9\"\n",
    );
    assert!(
        keylike.contains("the environment variable it names is not set"),
        "{keylike}"
    );
    for header in [
        "x-api-key",
        "api-key",
        "Cookie",
        "x-goog-api-key",
        "Ocp-Apim-Subscription-Key",
        "X-Auth-Token",
    ] {
        let said = error(&format!(
            "[upstreams.u]\nbase_url = \"http://127.0.0.1:1/v1\"\nheaders = {{ {header} = \"pasted-secret\" }}\n"
        ));
        assert!(said.contains("is not set from the file"), "{said}");
        assert!(!said.contains("pasted-secret"), "{said}");
    }
    for said in [pasted, keylike] {
        assert!(!said.contains("pasted"), "{said}");
    }
}
