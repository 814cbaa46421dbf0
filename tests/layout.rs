//! The shape of `src/` that README's "Layout" promises, checked on every test run: the layers
//! import only downwards, no module imports one that imports it back, no file grows past 500
//! lines, no handler builds its body with `json!`, no code is allowed to be dead, and every
//! file opens with its `//!` line.
//!
//! It reads the source as text. A parser of Rust would be exact, but `syn` with its `full`
//! feature would be a build of its own for one test; the source keeps to rustfmt's layout,
//! which is all this reader needs (comments stripped, `use` trees and `crate::`/`super::`
//! paths followed, each file's trailing `#[cfg(test)] mod tests` left out).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// A module's path below the crate root (`["services", "chat"]`); the root is empty.
type ModulePath = Vec<String>;

struct Module {
    file: PathBuf,
    /// The whole file, as it is.
    text: String,
    /// Its code outside tests, without comments.
    code: String,
}

/// Every module of the library under `src/` but its test modules (`main.rs` is the binary,
/// which uses the library from outside).
fn library() -> BTreeMap<ModulePath, Module> {
    let src = src();
    let mut modules = BTreeMap::new();
    for (file, text) in source_files() {
        let relative = file.strip_prefix(&src).expect("below src");
        let mut path: ModulePath = relative
            .with_extension("")
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        if path.last().is_some_and(|last| last == "mod") || path == ["lib"] {
            path.pop();
        }
        if path == ["main"] {
            continue;
        }
        let code = without_comments(until_tests(&text));
        modules.insert(path, Module { file, text, code });
    }
    let test_modules: Vec<ModulePath> = modules
        .iter()
        .flat_map(|(path, module)| {
            declared_test_modules(&module.text)
                .into_iter()
                .map(move |name| [path.clone(), vec![name]].concat())
        })
        .collect();
    modules.retain(|path, _| !test_modules.iter().any(|test| path.starts_with(test)));
    modules
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, tests and the binary's `main.rs` too, with its text.
fn source_files() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files
        .into_iter()
        .map(|file| {
            let text = fs::read_to_string(&file).expect("readable source");
            (file, text)
        })
        .collect()
}

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable folder") {
        let path = entry.expect("readable entry").path();
        if path.is_dir() {
            rust_files(&path, into);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            into.push(path);
        }
    }
}

/// The text before a file's inline test module, which rustfmt keeps last.
fn until_tests(text: &str) -> &str {
    text.find("#[cfg(test)]\nmod tests {")
        .map_or(text, |at| &text[..at])
}

/// The names of the modules a file declares under `#[cfg(test)]` in files of their own.
fn declared_test_modules(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    lines
        .windows(2)
        .filter(|pair| pair[0] == "#[cfg(test)]")
        .filter_map(|pair| pair[1].strip_prefix("mod ")?.strip_suffix(';'))
        .map(str::to_owned)
        .collect()
}

/// `code` without `//` comments (doc comments included); a `//` inside a string on the same
/// line goes too, which only ever hides a path from this reader, never adds one.
fn without_comments(code: &str) -> String {
    code.lines()
        .map(|line| line.find("//").map_or(line, |at| &line[..at]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `text[at..]` starts a word: the byte before is not part of an identifier or path.
fn starts_word(text: &str, at: usize) -> bool {
    text[..at]
        .chars()
        .next_back()
        .is_none_or(|before| !(before.is_alphanumeric() || before == '_' || before == ':'))
}

/// Every `use` statement's tree (after `use `, before `;`): rustfmt starts each on a line of
/// its own, after `pub` or `pub(…)` at most.
fn use_trees(code: &str) -> Vec<&str> {
    let mut trees = Vec::new();
    let mut line_start = 0;
    for line in code.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let statement = match trimmed.strip_prefix("pub") {
            Some(rest) if rest.starts_with('(') => {
                rest.split_once(") ").map_or("", |(_, after)| after)
            }
            Some(rest) => rest.trim_start(),
            None => trimmed,
        };
        if let Some(tree) = statement.strip_prefix("use ") {
            let at = line_start + (line.len() - tree.len());
            if let Some(end) = code[at..].find(';') {
                trees.push(code[at..at + end].trim());
            }
        }
        line_start += line.len();
    }
    trees
}

/// The full paths a `use` tree names, each below `prefix`: `a::{b, c::{self, d}}` names
/// `a::b`, `a::c` and `a::c::d`.
fn tree_paths(tree: &str, prefix: &[String]) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for item in top_level_items(tree) {
        let item = item.split(" as ").next().unwrap_or_default().trim();
        if item.is_empty() {
            continue;
        }
        let mut full = prefix.to_vec();
        if let Some(open) = item.find('{') {
            let head = item[..open].trim_end_matches("::");
            full.extend(segments(head));
            let close = item.rfind('}').filter(|&close| close > open);
            let inner = &item[open + 1..close.unwrap_or(item.len())];
            paths.extend(tree_paths(inner, &full));
        } else {
            full.extend(segments(item));
            if full
                .last()
                .is_some_and(|last| last == "self" || last == "*")
            {
                full.pop();
            }
            paths.push(full);
        }
    }
    paths
}

fn top_level_items(tree: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (at, byte) in tree.bytes().enumerate() {
        match byte {
            b'{' => depth += 1,
            b'}' => depth -= 1,
            b',' if depth == 0 => {
                items.push(&tree[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    items.push(&tree[start..]);
    items
}

fn segments(path: &str) -> Vec<String> {
    path.split("::")
        .map(str::trim)
        .filter(|segment| !segment.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `path` (`crate::…`, `super::…`, `self::…` as written in `module`) from the crate root;
/// `None` for a path that starts elsewhere (another crate, a name in scope).
fn absolute(module: &[String], path: &[String]) -> Option<Vec<String>> {
    let mut base = match path.first()?.as_str() {
        "crate" => Vec::new(),
        "self" => module.to_vec(),
        "super" => module[..module.len().checked_sub(1)?].to_vec(),
        _ => return None,
    };
    let mut rest = &path[1..];
    while rest.first().is_some_and(|segment| segment == "super") {
        base.pop();
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// Every module `module` uses: through its `use` trees, its inline `crate::`/`super::`/
/// `self::` paths and its children named by their bare names (`stream::Started`). Each
/// path counts as a use of the deepest module it reaches.
fn uses(
    modules: &BTreeMap<ModulePath, Module>,
    module: &[String],
    code: &str,
) -> BTreeSet<ModulePath> {
    let mut named = Vec::new();
    for tree in use_trees(code) {
        named.extend(tree_paths(tree, &[]));
    }
    for head in ["crate::", "super::", "self::"] {
        let mut rest = 0;
        while let Some(found) = code[rest..].find(head) {
            let at = rest + found;
            rest = at + head.len();
            let path = segments(path_at(&code[at..]));
            // `crate::{` opens a `use` tree, read above.
            if starts_word(code, at) && path.len() > 1 {
                named.push(path);
            }
        }
    }
    let mut used: BTreeSet<ModulePath> = named
        .iter()
        .filter_map(|path| absolute(module, path))
        .map(|path| deepest_module(modules, &path))
        .collect();
    for child in modules.keys().filter(|path| path.len() == module.len() + 1) {
        let name = &child[module.len()];
        if child.starts_with(module) && names_child(code, name) {
            used.insert(child.clone());
        }
    }
    used.remove(module);
    used
}

/// The `a::b::c` that starts `text`.
fn path_at(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(text.len());
    &text[..end]
}

fn names_child(code: &str, name: &str) -> bool {
    let needle = format!("{name}::");
    code.match_indices(&needle)
        .any(|(at, _)| starts_word(code, at))
}

fn deepest_module(modules: &BTreeMap<ModulePath, Module>, path: &[String]) -> ModulePath {
    (0..=path.len())
        .rev()
        .map(|len| path[..len].to_vec())
        .find(|prefix| modules.contains_key(prefix))
        .unwrap_or_default()
}

/// Each module and the modules it uses, but not a module's uses of its own ancestors: a
/// folder's files may use what their `mod.rs` defines (README, "Layout").
fn import_graph(
    modules: &BTreeMap<ModulePath, Module>,
) -> BTreeMap<ModulePath, BTreeSet<ModulePath>> {
    modules
        .iter()
        .map(|(path, module)| {
            let mut used = uses(modules, path, &module.code);
            used.retain(|target| !path.starts_with(target));
            (path.clone(), used)
        })
        .collect()
}

/// The circles of `graph`: each set of two or more modules that reach one another.
fn circles(graph: &BTreeMap<ModulePath, BTreeSet<ModulePath>>) -> Vec<Vec<String>> {
    let reaches = |from: &ModulePath| {
        let mut seen = BTreeSet::new();
        let mut next: Vec<&ModulePath> = vec![from];
        while let Some(module) = next.pop() {
            for target in graph.get(module).into_iter().flatten() {
                if seen.insert(target.clone()) {
                    next.push(target);
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&ModulePath, BTreeSet<ModulePath>> = graph
        .keys()
        .map(|module| (module, reaches(module)))
        .collect();
    let mut circles = BTreeSet::new();
    for (module, from_it) in &reached {
        let circle: Vec<String> = from_it
            .iter()
            .filter(|other| {
                reached
                    .get(other)
                    .is_some_and(|back| back.contains(*module))
            })
            .map(display)
            .collect();
        if !circle.is_empty() {
            circles.insert(circle);
        }
    }
    circles.into_iter().collect()
}

fn display(path: &ModulePath) -> String {
    if path.is_empty() {
        "crate".into()
    } else {
        path.join("::")
    }
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let circles = circles(&import_graph(&library()));
    assert!(circles.is_empty(), "import circles: {circles:?}");
}

#[test]
fn routes_import_nothing_from_the_database_layer() {
    let modules = library();
    let graph = import_graph(&modules);
    for (module, used) in graph
        .iter()
        .filter(|(path, _)| path.first().is_some_and(|top| top == "routes"))
    {
        let reached: Vec<_> = used
            .iter()
            .filter(|path| path.first().is_some_and(|top| top == "db"))
            .collect();
        assert!(reached.is_empty(), "{} uses {reached:?}", display(module));
    }
}

#[test]
fn services_take_what_they_use_and_never_the_crate_root() {
    let modules = library();
    for (path, module) in modules
        .iter()
        .filter(|(path, _)| path.first().is_some_and(|top| top == "services"))
    {
        let used = uses(&modules, path, &module.code);
        assert!(
            !used.contains(&Vec::new()),
            "{} imports the crate root",
            display(path)
        );
    }
}

#[test]
fn no_source_file_is_longer_than_five_hundred_lines() {
    for (file, text) in source_files() {
        let lines = text.lines().count();
        assert!(lines <= 500, "{} has {lines} lines", file.display());
    }
}

#[test]
fn handlers_answer_with_typed_bodies_never_json_macros() {
    for (path, module) in library() {
        if path.first().is_some_and(|top| top == "routes") {
            assert!(
                !module.code.contains("json!"),
                "{} builds a body with json!",
                module.file.display()
            );
        }
    }
}

#[test]
fn no_code_is_allowed_to_be_dead_and_every_file_opens_with_its_doc_line() {
    for (file, text) in source_files() {
        assert!(!text.contains("allow(dead_code)"), "{}", file.display());
        assert!(
            text.starts_with("//!"),
            "{} has no //! line",
            file.display()
        );
    }
}

// The reader itself, on modules made up for it: each rule would pass on anything if it
// could not see what it looks for.

fn made_up(files: &[(&str, &str)]) -> BTreeMap<ModulePath, Module> {
    files
        .iter()
        .map(|(path, text)| {
            let path = segments(path);
            let module = Module {
                file: PathBuf::from(display(&path)),
                text: text.to_string(),
                code: without_comments(until_tests(text)),
            };
            (path, module)
        })
        .collect()
}

#[test]
fn the_reader_finds_a_circle_through_use_trees_inline_paths_and_child_names() {
    let modules = made_up(&[
        ("", "mod a; mod b; mod c;"),
        ("a", "use crate::{b::{self, Thing as Other}, x};"),
        ("b", "fn f() { super::c::g() }"),
        ("c", "pub fn g() { crate::a::h() }"),
        ("c::d", "use super::super::b;"),
    ]);
    assert_eq!(circles(&import_graph(&modules)), [vec!["a", "b", "c"]]);
    // A child using its parent is not a circle; a parent naming its child is a use.
    let family = made_up(&[
        ("p", "fn f() { kid::g() }"),
        ("p::kid", "use super::Thing;"),
    ]);
    assert_eq!(
        import_graph(&family)[&segments("p")],
        BTreeSet::from([segments("p::kid")])
    );
    assert!(circles(&import_graph(&family)).is_empty());
}

#[test]
fn the_reader_leaves_out_comments_tests_and_other_crates() {
    let modules = made_up(&[
        (
            "a",
            "// use crate::b;\nuse std::fmt;\nfn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::b;\n}\n",
        ),
        ("b", "pub(crate) use crate::a::f;"),
        ("", "pub use a::f;"),
    ]);
    let graph = import_graph(&modules);
    assert!(graph[&segments("a")].is_empty());
    assert_eq!(graph[&segments("b")], BTreeSet::from([segments("a")]));
    assert!(circles(&graph).is_empty());
    let root_users = made_up(&[("services", "use crate::{db::Db, AppState};"), ("db", "")]);
    let used = uses(
        &root_users,
        &segments("services"),
        &root_users[&segments("services")].code,
    );
    assert_eq!(used, BTreeSet::from([Vec::new(), segments("db")]));
}
