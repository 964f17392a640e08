//! Source text of a pipeline file and errors that point into it.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A pipeline file's path (as the user wrote it) and its text, for locating errors.
#[derive(Debug, Clone)]
pub struct Source {
    /// Path as given on the command line, so messages show what the user typed.
    pub path: PathBuf,
    /// Full UTF-8 text of the file.
    pub text: String,
}

impl Source {
    /// Reads a pipeline file; an unreadable file is a config error naming it.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self {
                path: path.to_path_buf(),
                text,
            }),
            Err(e) => Err(ConfigError {
                file: path.to_path_buf(),
                location: None,
                message: format!("cannot read pipeline file: {e}"),
                snippet: None,
            }),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        // Spans come from the parser and fall on characters; never slice inside one if one does not.
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = self.text[line_start..offset].chars().count() + 1;
        (line, col)
    }

    /// An error located at `span` (a byte range into the text).
    pub fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        let message = message.into();
        let Some(span) = span else {
            return ConfigError {
                file: self.path.clone(),
                location: None,
                message,
                snippet: None,
            };
        };
        let (line, col) = self.line_col(span.start);
        let line_text = self.text.lines().nth(line - 1).unwrap_or("");
        let width = self.text[span.start.min(self.text.len())..span.end.min(self.text.len())]
            .lines()
            .next()
            .map_or(1, |s| s.chars().count().max(1));
        let gutter = line.to_string().len();
        let snippet = format!(
            "{:gutter$} |\n{line} | {line_text}\n{:gutter$} | {}{}",
            "",
            "",
            " ".repeat(col - 1),
            "^".repeat(width.min(line_text.chars().count().saturating_sub(col - 1).max(1))),
        );
        ConfigError {
            file: self.path.clone(),
            location: Some((line, col)),
            message,
            snippet: Some(snippet),
        }
    }

    /// Converts a TOML parse/deserialize error into a located config error.
    pub fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        self.error(err.span(), err.message().trim_end().to_string())
    }
}

/// A bad pipeline: names the file, and where known the line and column.
#[derive(Debug, Clone)]
pub struct ConfigError {
    /// The pipeline file.
    pub file: PathBuf,
    /// 1-based (line, column), when the error has a place in the file.
    pub location: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
    /// The offending source line with a caret under the place.
    pub snippet: Option<String>,
}

impl ConfigError {
    /// An error that is about the command line rather than a place in the file.
    pub fn without_location(file: &Path, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            location: None,
            message: message.into(),
            snippet: None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.file.display(), self.message)?
            }
            None => write!(f, "{}: {}", self.file.display(), self.message)?,
        }
        if let Some(snippet) = &self.snippet {
            write!(f, "\n{snippet}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}
