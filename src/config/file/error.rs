//! Why a configuration file cannot be used, and where in it.

use std::fmt;

/// Why a configuration file cannot be used, in one line: the file, the line and the field.
#[derive(Debug, PartialEq, Eq)]
pub struct FileError {
    pub file: String,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ", field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Where in the file something was written, to name it in an error.
pub struct Place<'a> {
    pub file: &'a str,
    pub line: usize,
}

impl Place<'_> {
    pub fn error(&self, field: String, message: impl Into<String>) -> FileError {
        FileError {
            file: self.file.to_string(),
            line: Some(self.line),
            field: Some(field),
            message: message.into(),
        }
    }
}
