//! `CORS_ORIGINS`: the origins whose pages may call the API from a browser. Unset or `*`,
//! any origin (the default); else a comma-separated list of `scheme://host[:port]`.

use reqwest::Url;

use super::{vars::Vars, ConfigError};

const VARIABLE: &str = "CORS_ORIGINS";

/// The origins listed, each as a browser writes it in `Origin` (`https://app.example.com`,
/// lower case, the port only when not the scheme's own); `None`: any origin.
pub(super) fn read(vars: &Vars<'_>) -> Result<Option<Box<[String]>>, ConfigError> {
    let listed = vars.string(VARIABLE, "*");
    if listed.trim() == "*" {
        return Ok(None);
    }
    let origins = listed
        .split(',')
        .map(str::trim)
        .filter(|origin| !origin.is_empty())
        .map(origin)
        .collect::<Result<Box<[String]>, _>>()?;
    if origins.is_empty() {
        return Err(ConfigError::new(
            VARIABLE,
            "names no origin; leave it unset (or `*`) for any",
        ));
    }
    Ok(Some(origins))
}

/// One origin of the list, as browsers serialise it.
fn origin(written: &str) -> Result<String, ConfigError> {
    let refused = |why: &str| {
        ConfigError::new(
            VARIABLE,
            format!("{written:?} is no origin ({why}): write scheme://host[:port], e.g. https://app.example.com"),
        )
    };
    let url = Url::parse(written).map_err(|_| refused("not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refused("not http or https"));
    }
    let bare = url.path() == "/" && url.query().is_none() && url.fragment().is_none();
    if !bare || !url.username().is_empty() || url.password().is_some() {
        return Err(refused("it has more than a scheme, host and port"));
    }
    let origin = url.origin();
    if !origin.is_tuple() {
        return Err(refused("no host"));
    }
    Ok(origin.ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_from(value: &str) -> Result<Option<Box<[String]>>, ConfigError> {
        let lookup = |name: &str| (name == VARIABLE).then(|| value.to_string());
        read(&Vars(&lookup))
    }

    #[test]
    fn origins_are_read_as_browsers_write_them_and_a_star_is_any() {
        assert_eq!(read_from("*").unwrap(), None);
        let origins =
            read_from(" https://App.Example.com , http://127.0.0.1:3000/,https://x.io:443")
                .unwrap();
        assert_eq!(
            origins.unwrap().as_ref(),
            [
                "https://app.example.com",
                "http://127.0.0.1:3000",
                "https://x.io"
            ]
        );
    }

    #[test]
    fn what_is_no_origin_is_refused_naming_the_variable() {
        for bad in [
            ",",
            "app.example.com",
            "ftp://x.io",
            "https://x.io/app",
            "https://u:p@x.io",
            "https://x.io/?a=1",
        ] {
            let err = read_from(bad).unwrap_err();
            assert_eq!(err.variable, VARIABLE, "{bad}");
        }
    }
}
