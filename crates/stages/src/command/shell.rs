//! Placeholders in a `shell` script, made safe: a value never becomes shell syntax.
//!
//! Pasting `{out}` or `{param}` into the script text let a value with `;` run a second command and a cache
//! path with a space ("My Drive") split into two words. Instead every placeholder becomes a reference to an
//! environment variable holding its value (`SAEFLOW_SUBST_<n>`), written for the quoting context it stands
//! in: `"${SAEFLOW_SUBST_0}"` where unquoted (one word, no globbing), `${SAEFLOW_SUBST_0}` inside double
//! quotes or an unquoted here-document, and `'"${SAEFLOW_SUBST_0}"'` inside single quotes (close, expand,
//! reopen). The shell expands parameters once and never re-parses the result, so no value can inject code.
//! The context is tracked by a small lexer of POSIX `sh` quoting: `'…'`, `"…"`, backslash escapes,
//! `$( … )` and backticks (which start an unquoted context even inside double quotes) and here-documents.

use std::collections::BTreeMap;

/// Where the lexer is in the script.
#[derive(Debug, Clone, PartialEq)]
enum Context {
    /// Unquoted, at top level or inside `$( … )` (with its count of open plain parentheses).
    Plain { parens: usize },
    /// Inside backticks.
    Backtick,
    /// Inside `'…'`.
    Single,
    /// Inside `"…"`.
    Double,
    /// In a here-document's body until a line equal to `delimiter`; `expands` unless the delimiter was
    /// quoted; `strip_tabs` for `<<-`.
    HereDoc {
        delimiter: String,
        expands: bool,
        strip_tabs: bool,
    },
}

/// A script with its placeholders replaced by variable references, and the variables to export.
#[derive(Debug, PartialEq)]
pub(super) struct Safe {
    /// The script to hand to `sh -c`.
    pub script: String,
    /// `SAEFLOW_SUBST_<n>` → value, one per distinct placeholder.
    pub env: Vec<(String, String)>,
}

/// The quoting lexer, fed the script's literal text piece by piece.
struct Lexer {
    stack: Vec<Context>,
    /// The previous character was an unescaped backslash (it escapes the next one).
    escaped: bool,
    /// Here-documents announced on the current line (`<<EOF`), whose bodies start at the next newline.
    pending: Vec<Context>,
    /// The current line so far (for here-document ends and `<<` detection).
    line: String,
}

impl Lexer {
    fn new() -> Self {
        Self {
            stack: vec![Context::Plain { parens: 0 }],
            escaped: false,
            pending: Vec::new(),
            line: String::new(),
        }
    }

    fn top(&self) -> &Context {
        self.stack.last().expect("the stack keeps its bottom frame")
    }

    fn feed(&mut self, text: &str) {
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            i += 1;
            if c == '\n' {
                self.end_line();
                continue;
            }
            self.line.push(c);
            if self.escaped {
                self.escaped = false;
                continue;
            }
            let top = self.top().clone();
            let substitutes = matches!(
                top,
                Context::Plain { .. } | Context::Backtick | Context::Double
            );
            if substitutes && c == '$' && next == Some('(') {
                // `$(` opens an unquoted context, even inside double quotes.
                self.line.push('(');
                i += 1;
                self.stack.push(Context::Plain { parens: 0 });
                continue;
            }
            match top {
                Context::HereDoc { .. } => {}
                Context::Single => {
                    if c == '\'' {
                        self.stack.pop();
                    }
                }
                Context::Double => match c {
                    '\\' => self.escaped = true,
                    '"' => {
                        self.stack.pop();
                    }
                    '`' => self.stack.push(Context::Backtick),
                    _ => {}
                },
                Context::Plain { .. } | Context::Backtick => match c {
                    '\\' => self.escaped = true,
                    '\'' => self.stack.push(Context::Single),
                    '"' => self.stack.push(Context::Double),
                    '`' if *self.top() == Context::Backtick => {
                        self.stack.pop();
                    }
                    '`' => self.stack.push(Context::Backtick),
                    '(' => {
                        if let Some(Context::Plain { parens }) = self.stack.last_mut() {
                            *parens += 1;
                        }
                    }
                    ')' => {
                        let depth = self.stack.len();
                        match self.stack.last_mut() {
                            Some(Context::Plain { parens }) if *parens > 0 => *parens -= 1,
                            Some(Context::Plain { .. }) if depth > 1 => {
                                self.stack.pop();
                            }
                            _ => {}
                        }
                    }
                    '<' if next == Some('<') && chars.get(i + 1) != Some(&'<') => {
                        self.line.push('<');
                        i += 1;
                        let rest: String = chars[i..].iter().collect();
                        let (heredoc, used) = here_doc(&rest);
                        self.line.extend(chars[i..i + used].iter());
                        i += used;
                        self.pending.extend(heredoc);
                    }
                    _ => {}
                },
            }
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        if self.escaped {
            // A backslash-newline continues the line.
            self.escaped = false;
            return;
        }
        if let Context::HereDoc {
            delimiter,
            strip_tabs,
            ..
        } = self.top()
        {
            let body = if *strip_tabs {
                line.trim_start_matches('\t')
            } else {
                line.as_str()
            };
            if body == delimiter {
                self.stack.pop();
            }
        }
        // Bodies start on the next line, the first announced first (so it goes on the stack last).
        while let Some(doc) = self.pending.pop() {
            self.stack.push(doc);
        }
    }

    /// How a placeholder is written where the lexer stands, or why it cannot be.
    fn reference(&self, var: &str) -> Result<String, String> {
        if self.escaped {
            return Err("a placeholder right after a backslash cannot be quoted safely".into());
        }
        Ok(match self.top() {
            Context::Plain { .. } | Context::Backtick => format!("\"${{{var}}}\""),
            Context::Double => format!("${{{var}}}"),
            Context::Single => format!("'\"${{{var}}}\"'"),
            Context::HereDoc { expands: true, .. } => format!("${{{var}}}"),
            Context::HereDoc { expands: false, .. } => {
                return Err(
                    "a placeholder inside a quoted here-document (<<'EOF') is never \
                            expanded by the shell: leave the delimiter unquoted"
                        .into(),
                )
            }
        })
    }
}

/// Parses what follows `<<`: an optional `-`, blanks, and the delimiter word (quoted or not). Returns the
/// here-document it announces and how many characters were consumed.
fn here_doc(rest: &str) -> (Option<Context>, usize) {
    let chars: Vec<char> = rest.chars().collect();
    let mut i = 0;
    let strip_tabs = chars.first() == Some(&'-');
    if strip_tabs {
        i += 1;
    }
    while chars.get(i).is_some_and(|c| *c == ' ' || *c == '\t') {
        i += 1;
    }
    let (mut delimiter, mut quoted) = (String::new(), false);
    while let Some(&c) = chars.get(i) {
        match c {
            '\'' | '"' => {
                quoted = true;
                let close = chars[i + 1..].iter().position(|&d| d == c);
                let end = close.map_or(chars.len(), |p| i + 1 + p);
                delimiter.extend(&chars[i + 1..end]);
                i = (end + 1).min(chars.len());
            }
            '\\' => {
                quoted = true;
                if let Some(&d) = chars.get(i + 1) {
                    delimiter.push(d);
                }
                i += 2;
            }
            c if c.is_whitespace() || ";&|<>()".contains(c) => break,
            c => {
                delimiter.push(c);
                i += 1;
            }
        }
    }
    let doc = (!delimiter.is_empty()).then_some(Context::HereDoc {
        delimiter,
        expands: !quoted,
        strip_tabs,
    });
    (doc, i.min(chars.len()))
}

/// Replaces every placeholder of `script` (already split into literal text and names by the caller's
/// placeholder parser) by a quoted variable reference, see the module docs.
pub(super) fn make_safe(
    pieces: &[super::Piece],
    vars: &BTreeMap<String, String>,
) -> Result<Safe, String> {
    let mut lexer = Lexer::new();
    let mut script = String::new();
    let mut names: BTreeMap<&str, String> = BTreeMap::new();
    let mut env = Vec::new();
    for piece in pieces {
        match piece {
            super::Piece::Text(text) => {
                lexer.feed(text);
                script.push_str(text);
            }
            super::Piece::Var(name) => {
                let value = vars
                    .get(name)
                    .ok_or_else(|| format!("unknown placeholder {{{name}}}"))?;
                let var = match names.get(name.as_str()) {
                    Some(var) => var.clone(),
                    None => {
                        let var = format!("SAEFLOW_SUBST_{}", env.len());
                        env.push((var.clone(), value.clone()));
                        names.insert(name, var.clone());
                        var
                    }
                };
                script.push_str(
                    &lexer
                        .reference(&var)
                        .map_err(|why| format!("placeholder {{{name}}}: {why}"))?,
                );
            }
        }
    }
    Ok(Safe { script, env })
}

#[cfg(test)]
mod tests {
    use super::super::pieces;
    use super::*;

    fn safe(script: &str) -> Result<Safe, String> {
        let vars = BTreeMap::from([
            ("out".to_string(), "/c/My Drive/o".to_string()),
            ("p".to_string(), "x; rm -rf /".to_string()),
        ]);
        make_safe(&pieces(script)?, &vars)
    }

    #[test]
    fn each_quoting_context_gets_its_own_reference() {
        let s = safe("echo {p} \"{p}\" '{p}' > {out}/x").unwrap();
        assert_eq!(
            s.script,
            "echo \"${SAEFLOW_SUBST_0}\" \"${SAEFLOW_SUBST_0}\" ''\"${SAEFLOW_SUBST_0}\"'' > \"${SAEFLOW_SUBST_1}\"/x"
        );
        assert_eq!(
            s.env,
            [
                ("SAEFLOW_SUBST_0".into(), "x; rm -rf /".into()),
                ("SAEFLOW_SUBST_1".into(), "/c/My Drive/o".into())
            ]
        );
    }

    #[test]
    fn command_substitution_is_unquoted_even_inside_double_quotes() {
        let s = safe("echo \"a $(cat {out}/f) b {p}\" `ls {out}` \"$(echo \"{p}\")\"").unwrap();
        assert_eq!(
            s.script,
            "echo \"a $(cat \"${SAEFLOW_SUBST_0}\"/f) b ${SAEFLOW_SUBST_1}\" `ls \"${SAEFLOW_SUBST_0}\"` \"$(echo \"${SAEFLOW_SUBST_1}\")\""
        );
    }

    #[test]
    fn escapes_and_parentheses_do_not_confuse_the_context() {
        // \" is not a quote; ( ) in a subshell do not close the $( ).
        let s = safe("echo \\\" {p}; x=$( (echo a) ; echo {p} ); echo \"\\\"{p}\"").unwrap();
        assert_eq!(
            s.script,
            "echo \\\" \"${SAEFLOW_SUBST_0}\"; x=$( (echo a) ; echo \"${SAEFLOW_SUBST_0}\" ); echo \"\\\"${SAEFLOW_SUBST_0}\""
        );
        assert!(safe("echo \\{p}").unwrap_err().contains("backslash"));
    }

    #[test]
    fn here_documents_expand_unquoted_and_refuse_quoted() {
        let s = safe("cat <<EOF > {out}/f\nline {p}\nEOF\necho {p}").unwrap();
        assert_eq!(
            s.script,
            "cat <<EOF > \"${SAEFLOW_SUBST_0}\"/f\nline ${SAEFLOW_SUBST_1}\nEOF\necho \"${SAEFLOW_SUBST_1}\""
        );
        let s = safe("cat <<-'E'\n\tquoted\n\tE\necho {p}").unwrap();
        assert_eq!(
            s.script,
            "cat <<-'E'\n\tquoted\n\tE\necho \"${SAEFLOW_SUBST_0}\""
        );
        assert!(safe("cat <<'EOF'\n{p}\nEOF")
            .unwrap_err()
            .contains("here-document"));
    }
}
