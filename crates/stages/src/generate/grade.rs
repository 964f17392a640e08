//! Grading a completion against a reference answer: normalised match, a multiple-choice parser, a regex, a
//! program, or an LLM judge. A grader never guesses: what it cannot read is `unparsable`, and a grader that
//! fails on one answer records why and goes on (`failed`); both are counted, never labelled.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::Context;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::shared::ChatEndpoint;

/// How completions are graded against the reference answer.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Grader {
    /// The normalised reference occurs in the normalised completion as whole words (SQuAD's normalisation:
    /// lower case, punctuation and the articles a/an/the dropped, whitespace collapsed); with `exact`, the
    /// whole normalised completion must equal it.
    Match {
        /// The completion must be the reference, not contain it.
        #[serde(default)]
        exact: bool,
    },
    /// Multiple choice: the first of `choices` the completion names, standing alone (`B`, `(B)`, `B.`,
    /// `Answer: B`; single capital letters are matched in capitals only, so the article "a" is not `A`;
    /// words such as `true` in any case), against the reference. A completion naming none is unparsable.
    Choice {
        /// The options, e.g. `["A", "B", "C", "D"]` or `["true", "false"]`.
        choices: Vec<String>,
    },
    /// The first match of `pattern` in the completion (its first capture group, when it has one),
    /// normalised as `match` does, against the normalised reference. No match is unparsable.
    Regex {
        /// A regular expression (Rust `regex` syntax).
        pattern: String,
    },
    /// A program grades: run once per completion with a JSON object on stdin (`question`, `reference`,
    /// `completion`, `instruction`); the first line it prints is the verdict (`correct`, `incorrect` or
    /// `unparsable`), the rest is recorded. A non-zero exit or another first line is a `failed` grade.
    Command {
        /// Program and arguments (no shell).
        argv: Vec<String>,
    },
    /// An LLM judges over an OpenAI-compatible chat API: it is shown the question, the reference answer and
    /// the completion and must reply `CORRECT`, `INCORRECT` or `UNPARSABLE` first.
    Judge {
        /// Base URL of an OpenAI-compatible API (`…/v1`); `/chat/completions` is appended.
        base_url: String,
        /// Chat model name sent to the endpoint.
        llm: String,
        /// Environment variable holding the API key (none is sent when it is unset).
        #[serde(default = "default_key_env")]
        api_key_env: String,
    },
}

fn default_key_env() -> String {
    "OPENAI_API_KEY".into()
}

/// What a grader concluded about one completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The completion gives the reference answer.
    Correct,
    /// The completion gives another answer.
    Incorrect,
    /// The grader could not read an answer in it.
    Unparsable,
    /// The completion is empty.
    Empty,
    /// The grader itself failed on this completion (recorded, counted).
    Failed,
    /// Nothing was generated: the prompt leaves no room in the context.
    NotGenerated,
    /// No grader was configured.
    Ungraded,
}

impl Verdict {
    /// The name written in the `grade` column.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Correct => "correct",
            Verdict::Incorrect => "incorrect",
            Verdict::Unparsable => "unparsable",
            Verdict::Empty => "empty",
            Verdict::Failed => "failed",
            Verdict::NotGenerated => "not_generated",
            Verdict::Ungraded => "ungraded",
        }
    }

    /// Every verdict.
    pub const ALL: [Verdict; 7] = [
        Verdict::Correct,
        Verdict::Incorrect,
        Verdict::Unparsable,
        Verdict::Empty,
        Verdict::Failed,
        Verdict::NotGenerated,
        Verdict::Ungraded,
    ];

    /// The verdict a `grade` column names.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// A verdict and what the grader read or said (the parsed answer, the program's or judge's output).
#[derive(Debug, Clone, PartialEq)]
pub struct Grade {
    /// The verdict.
    pub verdict: Verdict,
    /// The grader's own output for this completion.
    pub output: String,
}

impl Grade {
    fn new(verdict: Verdict, output: impl Into<String>) -> Self {
        Grade {
            verdict,
            output: output.into(),
        }
    }
}

/// One completion to grade.
#[derive(Debug, Clone, Serialize)]
pub struct Answer<'a> {
    /// The question as asked (before any instruction).
    pub question: &'a str,
    /// The reference answer.
    pub reference: &'a str,
    /// The completion.
    pub completion: &'a str,
    /// The instruction variant's name.
    pub instruction: &'a str,
}

/// A grader ready to run: its regex compiled, its endpoint set up.
#[derive(Debug)]
pub enum Ready {
    /// See [`Grader::Match`].
    Match {
        /// Whole-answer equality.
        exact: bool,
    },
    /// See [`Grader::Choice`].
    Choice(Vec<String>),
    /// See [`Grader::Regex`].
    Regex(regex::Regex),
    /// See [`Grader::Command`].
    Command(Vec<String>),
    /// See [`Grader::Judge`].
    Judge(ChatEndpoint),
}

impl Grader {
    /// Checks the settings and prepares the grader (`Err` names what is wrong, for the parameter's key).
    pub fn ready(&self) -> Result<Ready, String> {
        Ok(match self {
            Grader::Match { exact } => Ready::Match { exact: *exact },
            Grader::Choice { choices } => {
                if choices.len() < 2 {
                    return Err("a choice grader needs at least two `choices`".into());
                }
                if let Some(c) = choices
                    .iter()
                    .find(|c| c.trim().is_empty() || !c.chars().all(char::is_alphanumeric))
                {
                    return Err(format!(
                        "choice `{c}` is not a letter, number or word (letters and digits only)"
                    ));
                }
                Ready::Choice(choices.clone())
            }
            Grader::Regex { pattern } => Ready::Regex(
                regex::Regex::new(pattern).map_err(|e| format!("not a valid regex: {e}"))?,
            ),
            Grader::Command { argv } => {
                if argv.is_empty() {
                    return Err("a command grader needs `argv`".into());
                }
                Ready::Command(argv.clone())
            }
            Grader::Judge {
                base_url,
                llm,
                api_key_env,
            } => Ready::Judge(ChatEndpoint::new(base_url, llm, api_key_env, 0.0, 16)?),
        })
    }
}

/// SQuAD's answer normalisation: lower case, punctuation to spaces, articles dropped, whitespace collapsed.
pub fn normalize(text: &str) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    lowered
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whole-word containment of normalised texts.
fn contains_words(haystack: &str, needle: &str) -> bool {
    !needle.is_empty() && format!(" {haystack} ").contains(&format!(" {needle} "))
}

/// The first choice a completion names standing alone, i.e. as a whole word (choices are letters and
/// digits only): a single capital letter in capitals only, anything else in any case.
pub fn first_choice<'c>(completion: &str, choices: &'c [String]) -> Option<&'c str> {
    let names = |word: &str, choice: &str| {
        if choice.chars().count() == 1 && choice.chars().all(char::is_uppercase) {
            word == choice
        } else {
            word.to_lowercase() == choice.to_lowercase()
        }
    };
    completion
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .find_map(|word| choices.iter().find(|c| names(word, c)))
        .map(String::as_str)
}

/// The verdict of a judge's or program's reply: its first word, in any case.
fn verdict_word(reply: &str) -> Option<Verdict> {
    let first = reply
        .trim_start()
        .split(|c: char| !c.is_alphanumeric())
        .next()?;
    match first.to_lowercase().as_str() {
        "correct" => Some(Verdict::Correct),
        "incorrect" => Some(Verdict::Incorrect),
        "unparsable" => Some(Verdict::Unparsable),
        _ => None,
    }
}

const JUDGE_SYSTEM: &str = "You grade answers to questions. Reply with exactly one word first: CORRECT if \
the answer states the reference answer (in any wording), INCORRECT if it states a different answer, \
UNPARSABLE if it gives no answer. After that word you may add a short reason.";

impl Ready {
    /// Grades one completion. `Err` only for what stops the whole stage: a program that cannot be started,
    /// an endpoint that cannot be reached or refuses the request.
    pub fn grade(&self, answer: &Answer) -> anyhow::Result<Grade> {
        if answer.completion.trim().is_empty() {
            return Ok(Grade::new(Verdict::Empty, ""));
        }
        let by_text = |said: &str| {
            let said = normalize(said);
            let verdict = if said == normalize(answer.reference) {
                Verdict::Correct
            } else {
                Verdict::Incorrect
            };
            Grade::new(verdict, said)
        };
        Ok(match self {
            Ready::Match { exact } => {
                let (said, reference) = (normalize(answer.completion), normalize(answer.reference));
                if reference.is_empty() {
                    Grade::new(Verdict::Failed, "the reference answer is empty")
                } else if (*exact && said == reference)
                    || (!*exact && contains_words(&said, &reference))
                {
                    Grade::new(Verdict::Correct, said)
                } else {
                    Grade::new(Verdict::Incorrect, said)
                }
            }
            Ready::Choice(choices) => match first_choice(answer.completion, choices) {
                Some(c) => by_text(c),
                None => Grade::new(Verdict::Unparsable, ""),
            },
            Ready::Regex(re) => match re.captures(answer.completion) {
                Some(c) => by_text(c.get(1).or_else(|| c.get(0)).map_or("", |m| m.as_str())),
                None => Grade::new(Verdict::Unparsable, ""),
            },
            Ready::Command(argv) => run_command(argv, answer)?,
            Ready::Judge(endpoint) => {
                let user = format!(
                    "Question: {}\nReference answer: {}\nAnswer to grade: {}",
                    answer.question, answer.reference, answer.completion
                );
                let reply = endpoint.complete(JUDGE_SYSTEM, &user)?;
                match verdict_word(&reply) {
                    Some(v) => Grade::new(v, reply),
                    None => Grade::new(Verdict::Unparsable, reply),
                }
            }
        })
    }
}

fn run_command(argv: &[String], answer: &Answer) -> anyhow::Result<Grade> {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start the grader `{}`", argv[0]))?;
    let input = serde_json::to_vec(answer)?;
    let mut stdin = child.stdin.take().expect("piped");
    // A grader that exits without reading its input closes the pipe: that is its answer, not an error.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for the grader `{}`", argv[0]))?;
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Ok(Grade::new(
            Verdict::Failed,
            format!(
                "{} ({}): {}",
                argv[0],
                output.status,
                stderr.trim().chars().take(500).collect::<String>()
            ),
        ));
    }
    let first = stdout.lines().next().unwrap_or("").trim();
    Ok(match verdict_word(first).filter(|_| !first.contains(' ')) {
        Some(v) => Grade::new(v, stdout.trim_end()),
        None => Grade::new(
            Verdict::Failed,
            format!("first line is not correct/incorrect/unparsable: {stdout}"),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grade(grader: Grader, reference: &str, completion: &str) -> Grade {
        grader
            .ready()
            .unwrap()
            .grade(&Answer {
                question: "Q?",
                reference,
                completion,
                instruction: "honest",
            })
            .unwrap()
    }

    fn verdict(grader: Grader, reference: &str, completion: &str) -> Verdict {
        grade(grader, reference, completion).verdict
    }

    #[test]
    fn normalisation_is_squads() {
        assert_eq!(
            normalize("  The Eiffel-Tower, in PARIS!  "),
            "eiffel tower in paris"
        );
        assert_eq!(normalize("an apple a day"), "apple day");
        assert_eq!(normalize("São Paulo"), "são paulo");
        assert_eq!(normalize("..."), "");
    }

    #[test]
    fn match_finds_whole_words_and_exact_needs_the_whole_answer() {
        let m = || Grader::Match { exact: false };
        assert_eq!(
            verdict(m(), "Paris", "It is in Paris, France."),
            Verdict::Correct
        );
        assert_eq!(
            verdict(m(), "the Philippines", "Manila, philippines"),
            Verdict::Correct
        );
        // Whole words only: "Paris" is not in "Parisian", "Niger" not in "Nigeria".
        assert_eq!(
            verdict(m(), "Paris", "A Parisian suburb"),
            Verdict::Incorrect
        );
        assert_eq!(
            verdict(m(), "Niger", "Lagos is in Nigeria"),
            Verdict::Incorrect
        );
        assert_eq!(verdict(m(), "Paris", "   \n "), Verdict::Empty);
        let g = grade(m(), "...", "Paris");
        assert_eq!(
            g.verdict,
            Verdict::Failed,
            "an empty reference cannot be matched"
        );
        let exact = || Grader::Match { exact: true };
        assert_eq!(verdict(exact(), "Paris", "paris."), Verdict::Correct);
        assert_eq!(verdict(exact(), "Paris", "It is Paris"), Verdict::Incorrect);
    }

    #[test]
    fn choices_are_read_as_whole_words_first_one_wins_none_is_unparsable() {
        let letters = || Grader::Choice {
            choices: vec!["A".into(), "B".into(), "C".into()],
        };
        assert_eq!(verdict(letters(), "B", "(B) because"), Verdict::Correct);
        assert_eq!(verdict(letters(), "B", "Answer: B."), Verdict::Correct);
        assert_eq!(verdict(letters(), "B", "B"), Verdict::Correct);
        assert_eq!(verdict(letters(), "B", "C, not B"), Verdict::Incorrect);
        // The article "a" is not the letter A, and letters inside words are not choices.
        assert_eq!(verdict(letters(), "C", "a cat. C"), Verdict::Correct);
        assert_eq!(
            verdict(letters(), "A", "Because the CAB said so"),
            Verdict::Unparsable
        );
        let g = grade(letters(), "A", "I would rather not say");
        assert_eq!(g.verdict, Verdict::Unparsable, "{g:?}");
        assert_eq!(g.output, "");
        let words = || Grader::Choice {
            choices: vec!["true".into(), "false".into()],
        };
        assert_eq!(
            verdict(words(), "false", "FALSE. It is true that"),
            Verdict::Correct
        );
        assert_eq!(verdict(words(), "true", "True!"), Verdict::Correct);
        assert_eq!(verdict(words(), "true", "untrue"), Verdict::Unparsable);
        assert!(Grader::Choice {
            choices: vec!["A".into()]
        }
        .ready()
        .is_err());
        assert!(Grader::Choice {
            choices: vec!["A)".into(), "B".into()]
        }
        .ready()
        .is_err());
    }

    #[test]
    fn regex_compares_its_first_group_or_match_and_no_match_is_unparsable() {
        let re = |p: &str| Grader::Regex { pattern: p.into() };
        assert_eq!(
            verdict(re(r"answer is (\w+)"), "Mercury", "The answer is mercury."),
            Verdict::Correct
        );
        assert_eq!(verdict(re(r"\d+"), "8", "It has 8 legs"), Verdict::Correct);
        assert_eq!(
            verdict(re(r"\d+"), "8", "It has 6 legs"),
            Verdict::Incorrect
        );
        assert_eq!(verdict(re(r"\d+"), "8", "Many legs"), Verdict::Unparsable);
        assert!(Grader::Regex {
            pattern: "(unclosed".into()
        }
        .ready()
        .unwrap_err()
        .contains("not a valid regex"));
    }

    #[test]
    fn a_command_grades_from_its_first_line_and_its_failures_are_recorded() {
        let sh = |script: &str| Grader::Command {
            argv: vec!["sh".into(), "-c".into(), script.into()],
        };
        // The program gets the answer as JSON on stdin.
        let g = grade(
            sh(
                r#"grep -q '"completion":"Paris"' && printf 'CORRECT\nsaw Paris\n' || echo incorrect"#,
            ),
            "Paris",
            "Paris",
        );
        assert_eq!(g.verdict, Verdict::Correct);
        assert_eq!(g.output, "CORRECT\nsaw Paris");
        assert_eq!(
            verdict(sh("cat >/dev/null; echo incorrect"), "x", "y"),
            Verdict::Incorrect
        );
        assert_eq!(
            verdict(sh("echo unparsable"), "x", "y"),
            Verdict::Unparsable
        );
        let g = grade(sh("echo 'correct, I think'"), "x", "y");
        assert_eq!(g.verdict, Verdict::Failed, "{g:?}");
        let g = grade(sh("echo broken >&2; exit 3"), "x", "y");
        assert_eq!(g.verdict, Verdict::Failed);
        assert!(g.output.contains("broken"), "{}", g.output);
        let missing = Grader::Command {
            argv: vec!["/nonexistent/grader".into()],
        };
        let e = missing
            .ready()
            .unwrap()
            .grade(&Answer {
                question: "Q",
                reference: "R",
                completion: "C",
                instruction: "i",
            })
            .unwrap_err();
        assert!(e.to_string().contains("cannot start the grader"), "{e}");
    }

    #[test]
    fn verdict_names_round_trip() {
        for v in Verdict::ALL {
            assert_eq!(Verdict::parse(v.name()), Some(v));
        }
        let names: std::collections::BTreeSet<&str> =
            Verdict::ALL.iter().map(|v| v.name()).collect();
        assert_eq!(names.len(), Verdict::ALL.len(), "two verdicts share a name");
        assert_eq!(
            verdict_word("  Incorrect: Lyon is not"),
            Some(Verdict::Incorrect)
        );
        assert_eq!(verdict_word("I'd say correct"), None);
    }
}
