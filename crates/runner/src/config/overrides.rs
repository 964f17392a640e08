//! `-S stage.param=value[,value...]` overrides: splitting the argument, typing its values (TOML syntax when
//! it parses, then against the parameter's declared type) and setting them in stage tables or the
//! `[pipeline]` header. The typing also serves `[sweep]` values, which are checked the same way.

use serde::Deserialize;
use toml::de::{DeValue, ValueDeserializer};

use super::PipelineHeader;
use crate::stage::StageKind;

/// A `-S stage.param=value[,value...]` argument, split but not yet typed.
#[derive(Debug, Clone)]
pub struct Override {
    /// The argument as typed, for messages.
    pub arg: String,
    /// Stage name (or `pipeline`).
    pub stage: String,
    /// Parameter name.
    pub param: String,
    /// Raw values; more than one makes a sweep axis.
    pub values: Vec<String>,
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(arg: &str) -> Result<Self, String> {
        let bad = || format!("invalid -S `{arg}`: expected stage.param=value[,value...]");
        let (path, raw) = arg.split_once('=').ok_or_else(bad)?;
        let (stage, param) = path.trim().split_once('.').ok_or_else(bad)?;
        if stage.is_empty() || param.is_empty() || raw.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            arg: arg.to_string(),
            stage: stage.to_string(),
            param: param.to_string(),
            values: split_top_level(raw),
        })
    }
}

/// Splits `a,[b,c],"d,e"` on commas outside brackets and quotes.
fn split_top_level(raw: &str) -> Vec<String> {
    let (mut parts, mut current, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None);
    for c in raw.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts.into_iter().map(|p| p.trim().to_string()).collect()
}

/// Types a command-line value: TOML syntax when it parses (`3`, `1e-5`, `true`, `[1,2]`, `"x"`), else a bare
/// string. Whether `3` means the integer or the string is decided against the parameter's type later.
pub(super) fn parse_cli_value(raw: &str) -> toml::Value {
    DeValue::parse(raw)
        .ok()
        .and_then(|v| toml::Value::deserialize(ValueDeserializer::from(v)).ok())
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// The parameter must be one the stage kind declares (for a dotted one, its first part).
pub(super) fn check_param_exists(kind: &dyn StageKind, param: &str) -> Result<(), String> {
    let param = param.split('.').next().unwrap_or(param);
    let schema = kind.schema();
    let props = schema.get("properties").and_then(|p| p.as_object());
    match props {
        Some(p) if p.contains_key(param) => Ok(()),
        Some(p) => Err(format!(
            "stage kind `{}` has no parameter `{param}` (parameters: {})",
            kind.kind(),
            p.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
        None => Err(format!("stage kind `{}` takes no parameters", kind.kind())),
    }
}

/// Types a value by the parameter's schema: if the value as parsed does not fit but its text as a string
/// does (or the reverse), the fitting one wins. `base` is the stage's table the value is tried in.
pub(super) fn type_value(
    kind: &dyn StageKind,
    base: &toml::Table,
    param: &str,
    value: toml::Value,
    text: &str,
) -> Result<toml::Value, String> {
    let try_with = |v: &toml::Value| {
        let mut t = base.clone();
        set_param(&mut t, param, v.clone());
        kind.resolve_value(toml::Value::Table(t))
    };
    match try_with(&value) {
        Ok(_) => Ok(value),
        Err(first) => {
            let as_string = toml::Value::String(text.trim_matches('"').to_string());
            if !value.is_str() && try_with(&as_string).is_ok() {
                Ok(as_string)
            } else {
                Err(format!("`{param}` = {text}: {first}"))
            }
        }
    }
}

/// Applies a `-S pipeline.SETTING=value` override to the header; the error is the message to follow
/// `-S ARG: `.
pub(super) fn override_header(header: &mut PipelineHeader, o: &Override) -> Result<(), String> {
    if o.values.len() != 1 {
        return Err("pipeline settings take one value, not a sweep".into());
    }
    let v = &o.values[0];
    match o.param.as_str() {
        "seed" => {
            header.seed = v
                .parse()
                .map_err(|_| format!("seed must be a non-negative integer, got `{v}`"))?
        }
        "device" => header.device = v.parse()?,
        "name" => header.name = v.clone(),
        p => {
            return Err(format!(
                "unknown pipeline setting `{p}` (name, device, seed)"
            ))
        }
    }
    Ok(())
}

/// Sets a (possibly dotted, e.g. `params.x`) parameter in a stage table, creating nested tables as needed.
pub fn set_param(table: &mut toml::Table, path: &str, value: toml::Value) {
    match path.split_once('.') {
        None => {
            table.insert(path.to_string(), value);
        }
        Some((head, rest)) => {
            let child = table
                .entry(head.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !child.is_table() {
                *child = toml::Value::Table(toml::Table::new());
            }
            set_param(child.as_table_mut().expect("table"), rest, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_override_values_outside_brackets_and_quotes() {
        assert_eq!(split_top_level("1,2,3"), ["1", "2", "3"]);
        assert_eq!(split_top_level("[1,2],\"a,b\""), ["[1,2]", "\"a,b\""]);
    }

    #[test]
    fn types_cli_values_as_toml_when_possible() {
        assert_eq!(parse_cli_value("3"), toml::Value::Integer(3));
        assert_eq!(parse_cli_value("1e-5"), toml::Value::Float(1e-5));
        assert_eq!(parse_cli_value("topk"), toml::Value::String("topk".into()));
    }
}
