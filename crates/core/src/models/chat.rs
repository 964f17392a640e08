//! A model's own chat template — the Jinja source in `tokenizer_config.json` or the GGUF's
//! `tokenizer.chat_template` — rendered with a real Jinja engine (minijinja) set up as Hugging Face's
//! `apply_chat_template` sets up jinja2: `trim_blocks`, `lstrip_blocks`, loop controls, `tojson`,
//! `raise_exception`, and Python string methods (`.strip()`, `.startswith()`, …). `strftime_now` is left
//! undefined on purpose, so templates that date the system prompt fall back to their fixed default date and
//! renders stay reproducible.

use anyhow::Context;
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};

/// One role's message.
pub type Message<'a> = (&'a str, &'a str);

/// A compiled chat template and the special-token strings it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the strings the template's `bos_token` and
    /// `eos_token` variables hold (empty when the tokenizer has none).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .context("the model's chat template is not valid Jinja")?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template's text for `messages` (role, content), ending with the assistant's header when
    /// `add_generation_prompt` — what `tokenizer.apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=…)` returns.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|(role, content)| Value::from_pairs([("role", *role), ("content", *content)]))
            .collect();
        self.env
            .get_template(NAME)
            .expect("added in new")
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .context("rendering the model's chat template")
    }

    /// `messages` rendered as pieces: `(text, false)` written by the template, `(text, true)` a message's
    /// own content. The content is passed through markers, so the template's own text can be tokenized with
    /// special tokens while data never is; a template that edits contents (`| trim`) edits the markers, and
    /// the content is kept as written.
    pub fn pieces(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> anyhow::Result<Vec<(String, bool)>> {
        let markers: Vec<String> = (0..messages.len()).map(marker).collect();
        let marked: Vec<Message> = messages
            .iter()
            .zip(&markers)
            .map(|((role, _), m)| (*role, m.as_str()))
            .collect();
        let mut text = self.render(&marked, add_generation_prompt)?;
        let mut pieces = Vec::new();
        for (i, (_, content)) in messages.iter().enumerate() {
            let Some(at) = text.find(&markers[i]) else {
                anyhow::bail!("the model's chat template leaves out message {i}'s content");
            };
            let rest = text.split_off(at + markers[i].len());
            text.truncate(at);
            pieces.push((std::mem::take(&mut text), false));
            pieces.push((content.to_string(), true));
            text = rest;
        }
        pieces.push((text, false));
        pieces.retain(|(t, data)| *data || !t.is_empty());
        Ok(pieces)
    }
}

/// transformers' `tojson`: `json.dumps` (`ensure_ascii=False`), without the HTML escaping of `<`, `>`, `&`
/// and `'` that Jinja's own filter (and minijinja's) adds; `indent` as there, the other keyword arguments
/// accepted.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    for ignored in ["ensure_ascii", "separators", "sort_keys"] {
        let _: Option<Value> = kwargs.get(ignored)?;
    }
    kwargs.assert_all_used()?;
    let json = minijinja::filters::tojson(
        value,
        indent,
        Kwargs::from_iter(Vec::<(&str, Value)>::new()),
    )?;
    let json = json.as_str().unwrap_or_default();
    // Undo exactly the four HTML escapes; other escapes (`\\`, `\n`, …) stay as JSON wrote them.
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..];
        let plain = [
            ("\\u003c", '<'),
            ("\\u003e", '>'),
            ("\\u0026", '&'),
            ("\\u0027", '\''),
        ]
        .into_iter()
        .find(|(e, _)| escape.starts_with(e));
        match plain {
            Some((e, c)) => {
                out.push(c);
                rest = &escape[e.len()..];
            }
            None => {
                // A two-character escape (or the start of another \uXXXX): copy it whole.
                let n = escape.chars().nth(1).map_or(1, |c| 1 + c.len_utf8());
                out.push_str(&escape[..n]);
                rest = &escape[n..];
            }
        }
    }
    out.push_str(rest);
    Ok(Value::from(out))
}

/// A marker no data contains: private-use characters around the message index.
fn marker(i: usize) -> String {
    format!("\u{F8FF}{i}\u{F8FE}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    /// Every render of `tests/fixtures/chat_templates.json` (SmolLM2's, Llama 3's and Gemma 2's templates verbatim, and a
    /// multi-line one that exercises trim_blocks, lstrip_blocks, `.strip()`, `break` and `tojson`), made by
    /// jinja2 configured as transformers configures it (`scripts/make_chat_fixtures.py`), byte for byte.
    #[test]
    fn renders_as_hugging_faces_jinja2_does() {
        let fixture: serde_json::Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/chat_templates.json"
        )))
        .unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 16);
        for case in cases {
            let s = |k: &str| case[k].as_str().unwrap();
            let template =
                ChatTemplate::new(s("template"), s("bos_token"), s("eos_token")).unwrap();
            let messages: Vec<(&str, &str)> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| (m[0].as_str().unwrap(), m[1].as_str().unwrap()))
                .collect();
            let generation = case["add_generation_prompt"].as_bool().unwrap();
            let rendered = template.render(&messages, generation);
            match case["error"].as_str() {
                // Gemma 2's template refuses a system turn: so must we, with its message.
                Some(error) => {
                    let e = format!("{:#}", rendered.unwrap_err());
                    assert!(
                        e.contains(error),
                        "{} {messages:?}: {e}",
                        s("template_name")
                    );
                }
                None => assert_eq!(
                    rendered.unwrap(),
                    s("expected"),
                    "{} {messages:?}",
                    s("template_name")
                ),
            }
        }
    }

    #[test]
    fn pieces_put_contents_between_the_templates_own_text() {
        let t = ChatTemplate::new(SMOL, "", "<|im_end|>").unwrap();
        let pieces = t.pieces(&[("user", "Hi <|im_end|>")], true).unwrap();
        assert_eq!(
            pieces,
            vec![
                (
                    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
                     Face<|im_end|>\n<|im_start|>user\n"
                        .to_string(),
                    false
                ),
                ("Hi <|im_end|>".to_string(), true),
                ("<|im_end|>\n<|im_start|>assistant\n".to_string(), false),
            ]
        );
        let e = ChatTemplate::new("{% if %}", "", "").unwrap_err();
        assert!(format!("{e:#}").contains("not valid Jinja"), "{e:#}");
        let raising = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let e = raising.render(&[("system", "x")], false).unwrap_err();
        assert!(format!("{e:#}").contains("no system role"), "{e:#}");
    }
}
