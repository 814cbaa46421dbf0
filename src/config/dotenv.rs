//! `.env` in the working directory, read whole before the configuration: a line that cannot
//! be read stops start-up naming it, since every variable after it would otherwise take its
//! default without a word (dotenvy stops at the first bad line).

use std::{io, path::Path};

/// The file, beside the process.
const DOTENV: &str = ".env";

/// Sets each variable `.env` names that the environment does not set already, when there is
/// such a file; or, when it cannot be read whole, says where (never what the line holds,
/// which may be a key), and sets none. A UTF-8 byte-order mark at its start is allowed.
pub fn load() -> Result<(), String> {
    load_from(Path::new(DOTENV))
}

fn load_from(path: &Path) -> Result<(), String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        // Absent, but not a link to nothing: that is a mistake to name.
        Err(err)
            if err.kind() == io::ErrorKind::NotFound
                && std::fs::symlink_metadata(path).is_err() =>
        {
            return Ok(())
        }
        Err(err) => return Err(format!("{DOTENV}: cannot be read ({err})")),
    };
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let pairs = read(text).map_err(|reason| format!("{DOTENV}, {reason}"))?;
    for (name, value) in pairs {
        if std::env::var_os(&name).is_none() {
            std::env::set_var(name, value);
        }
    }
    Ok(())
}

/// Every `NAME=value` of `text`, or where the first line that is not one stands.
fn read(text: &[u8]) -> Result<Vec<(String, String)>, String> {
    let Ok(whole) = std::str::from_utf8(text) else {
        return Err("line 1 or later: not UTF-8 text".into());
    };
    dotenvy::from_read_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| match err {
            dotenvy::Error::LineParse(line, _) => {
                // Where a line begins with it (a comment may hold the same text).
                let at = whole
                    .match_indices(line.as_str())
                    .map(|(at, _)| at)
                    .find(|&at| at == 0 || whole.as_bytes()[at - 1] == b'\n')
                    .unwrap_or(0);
                let number = whole[..at].matches('\n').count() + 1;
                format!("line {number}: not a NAME=value line (the lines after it are not read)")
            }
            other => format!("cannot be read ({other})"),
        })
}

#[cfg(test)]
mod tests {
    use super::{load_from, read};

    #[test]
    fn no_file_is_nothing_to_read_but_a_link_to_nothing_stops_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        assert_eq!(load_from(&path), Ok(()));
        std::os::unix::fs::symlink(dir.path().join("gone"), &path).unwrap();
        assert!(load_from(&path)
            .unwrap_err()
            .starts_with(".env: cannot be read"));
    }

    #[test]
    fn a_line_that_is_no_variable_is_named_by_its_number_and_never_shown() {
        let good = read(b"# settings\nCHAT_COST=7\n\nLLM_MODEL=\"llama3.2\"\n").unwrap();
        assert_eq!(
            good,
            [
                ("CHAT_COST".to_string(), "7".to_string()),
                ("LLM_MODEL".to_string(), "llama3.2".to_string())
            ]
        );
        let broken = "CHAT_COST=7\nLLM_API_KEY=sk-\"secret\nDATABASE_URL=sqlite://x.db\n";
        let said = read(broken.as_bytes()).unwrap_err();
        assert!(said.starts_with("line 2: not a NAME=value line"), "{said}");
        assert!(!said.contains("secret"), "{said}");
        let spaced = read(b"CHAT_COST=7\nFOO BAR=1\nCHAT_COST=9\n").unwrap_err();
        assert!(spaced.starts_with("line 2:"), "{spaced}");
        let commented = read(b"#FOO BAR=1\nCHAT_COST=7\nFOO BAR=1\n").unwrap_err();
        assert!(commented.starts_with("line 3:"), "{commented}");
        assert!(read(b"CHAT_COST=\xff\n").unwrap_err().contains("not UTF-8"));
    }
}
