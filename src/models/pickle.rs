//! A pickle *reader* that never executes anything.
//!
//! Written by hand because no crate does what untrusted checkpoints need: `candle_core::pickle` silently
//! drops entries it does not understand (a pickle calling `os.system` "loads" with those entries missing),
//! and handles neither protocol 4 nor every storage type; `serde-pickle` cannot represent torch's
//! persistent ids. This reader interprets the opcodes of protocols 0–5 that data (not code) needs, and
//! treats `GLOBAL`/`STACK_GLOBAL` + `REDUCE`/`NEWOBJ`/`BUILD` as *records* (class name, arguments, state)
//! — after checking the class against a caller-given allow-list. Anything else is an error that names it.

use std::collections::BTreeMap;

use anyhow::{bail, Context};

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// A boolean.
    Bool(bool),
    /// An integer that fits in i64.
    Int(i64),
    /// A float.
    Float(f64),
    /// A text string.
    Str(String),
    /// A byte string.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict (insertion order kept; `collections.OrderedDict()` becomes one too).
    Dict(Vec<(Value, Value)>),
    /// A reference to an allowed class or function (`module.name`).
    Global(String),
    /// An allowed class applied to arguments (`REDUCE`/`NEWOBJ`), with the state `BUILD` gave it.
    Object {
        /// `module.name` of the callable.
        class: String,
        /// Its arguments.
        args: Vec<Value>,
        /// State from `BUILD`, if any.
        state: Option<Box<Value>>,
    },
    /// A persistent id (torch uses them for tensor storages).
    PersistentId(Box<Value>),
}

impl Value {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }
    /// Tuple or list items.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }
    /// Looks a string key up in a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Reads a pickle. `allowed` lists the `module.name` globals that may appear; any other is refused.
pub fn parse(bytes: &[u8], allowed: &[&str]) -> anyhow::Result<Value> {
    Machine {
        bytes,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: BTreeMap::new(),
        allowed,
    }
    .run()
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: BTreeMap<u64, Value>,
    allowed: &'a [&'a str],
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> anyhow::Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!(
                "pickle is truncated (wanted {n} bytes at offset {})",
                self.pos
            )
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> anyhow::Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn line(&mut self) -> anyhow::Result<String> {
        let rest = &self.bytes[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("pickle is truncated (unterminated line)")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn pop(&mut self) -> anyhow::Result<Value> {
        self.stack
            .pop()
            .context("malformed pickle: stack underflow")
    }
    fn pop_mark(&mut self) -> anyhow::Result<Vec<Value>> {
        let mark = self.marks.pop().context("malformed pickle: no MARK")?;
        if mark > self.stack.len() {
            bail!("malformed pickle: MARK beyond the stack");
        }
        Ok(self.stack.split_off(mark))
    }
    fn text(&mut self, n: usize) -> anyhow::Result<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(
            String::from_utf8(b.to_vec()).context("malformed pickle: string is not UTF-8")?,
        ))
    }
    fn global(&self, module: &str, name: &str) -> anyhow::Result<Value> {
        let full = format!("{module}.{name}");
        if !self.allowed.contains(&full.as_str()) {
            bail!(
                "refusing pickle global `{full}`: only {} may appear in this file",
                self.allowed.join(", ")
            );
        }
        Ok(Value::Global(full))
    }
    fn len(&mut self, n: u64) -> anyhow::Result<usize> {
        let n = usize::try_from(n).context("malformed pickle: length overflows")?;
        if n > self.bytes.len() - self.pos {
            bail!(
                "pickle is truncated (a {n}-byte item at offset {})",
                self.pos
            );
        }
        Ok(n)
    }
    fn call(&mut self, callable: Value, args: Vec<Value>) -> anyhow::Result<Value> {
        match callable {
            Value::Global(class) if class == "collections.OrderedDict" => {
                if !args.is_empty() {
                    bail!("unsupported pickle: OrderedDict with arguments");
                }
                Ok(Value::Dict(Vec::new()))
            }
            Value::Global(class) => Ok(Value::Object {
                class,
                args,
                state: None,
            }),
            other => bail!("malformed pickle: calling {other:?}"),
        }
    }
    fn set_items(target: &mut Value, items: Vec<Value>) -> anyhow::Result<()> {
        let Value::Dict(d) = target else {
            bail!("malformed pickle: SETITEMS on a non-dict")
        };
        if !items.len().is_multiple_of(2) {
            bail!("malformed pickle: odd number of dict items");
        }
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn run(mut self) -> anyhow::Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        bail!("unsupported pickle protocol {proto}");
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a size hint
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v.into()))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v.into()))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v.into()))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        bail!("unsupported pickle: integer wider than 64 bits");
                    }
                    let mut buf = [if b.last().is_some_and(|x| x & 0x80 != 0) {
                        0xff
                    } else {
                        0
                    }; 8];
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8"));
                    self.stack.push(Value::Float(v));
                }
                b'X' => {
                    let n = self.u32()? as u64;
                    let n = self.len(n)?;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.u64()?;
                    let n = self.len(n)?;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(if op == b'U' {
                        Value::Str(String::from_utf8_lossy(&b).into_owned())
                    } else {
                        Value::Bytes(b)
                    });
                }
                b'T' | b'B' => {
                    let n = self.u32()? as u64;
                    let n = self.len(n)?;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(if op == b'T' {
                        Value::Str(String::from_utf8_lossy(&b).into_owned())
                    } else {
                        Value::Bytes(b)
                    });
                }
                0x8e => {
                    let n = self.u64()?;
                    let n = self.len(n)?;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'q' => {
                    let i = self.u8()? as u64;
                    let v = self
                        .stack
                        .last()
                        .context("malformed pickle: BINPUT on empty stack")?
                        .clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()? as u64;
                    let v = self
                        .stack
                        .last()
                        .context("malformed pickle: LONG_BINPUT on empty stack")?
                        .clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    let v = self
                        .stack
                        .last()
                        .context("malformed pickle: MEMOIZE on empty stack")?
                        .clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let v = self
                        .memo
                        .get(&i)
                        .with_context(|| format!("malformed pickle: memo {i} is empty"))?
                        .clone();
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(&module, &name)?;
                    self.stack.push(g);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module.as_str(), name.as_str()) {
                        (Some(m), Some(n)) => {
                            let g = self.global(m, n)?;
                            self.stack.push(g)
                        }
                        _ => bail!("malformed pickle: STACK_GLOBAL needs two strings"),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        bail!("malformed pickle: stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let mut d = Value::Dict(Vec::new());
                    Self::set_items(&mut d, items)?;
                    self.stack.push(d);
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.stack.last_mut() {
                        Some(Value::List(l)) => l.push(v),
                        _ => bail!("malformed pickle: APPEND to a non-list"),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.stack.last_mut() {
                        Some(Value::List(l)) => l.extend(items),
                        _ => bail!("malformed pickle: APPENDS to a non-list"),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    Self::set_items(
                        self.stack
                            .last_mut()
                            .context("malformed pickle: SETITEM on empty stack")?,
                        vec![k, v],
                    )?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    Self::set_items(
                        self.stack
                            .last_mut()
                            .context("malformed pickle: SETITEMS on empty stack")?,
                        items,
                    )?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let Value::Tuple(args) = args else {
                        bail!("malformed pickle: REDUCE arguments are not a tuple")
                    };
                    let v = self.call(callable, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let Value::Tuple(args) = args else {
                        bail!("malformed pickle: NEWOBJ arguments are not a tuple")
                    };
                    let v = self.call(class, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    match self.stack.last_mut() {
                        Some(Value::Object { state: s, .. }) => *s = Some(Box::new(state)),
                        Some(Value::Dict(_)) if state == Value::None => {}
                        _ => bail!("malformed pickle: BUILD on a value that is not an object"),
                    }
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.stack.push(Value::PersistentId(Box::new(id)));
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self
                        .stack
                        .last()
                        .context("malformed pickle: DUP on empty stack")?
                        .clone();
                    self.stack.push(v);
                }
                other => bail!("unsupported pickle opcode 0x{other:02x} at offset {at}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_os_system_and_names_it() {
        // pickle.dumps(os.system-reduce) at protocol 2: GLOBAL 'posix system', args ('echo pwned',), REDUCE.
        let evil = b"\x80\x02cposix\nsystem\nq\x00X\n\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.";
        let err = parse(evil, &["collections.OrderedDict"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refusing pickle global `posix.system`"),
            "{err}"
        );
    }

    #[test]
    fn reads_protocol_4_dicts_bytes_and_memo() {
        // pickle.dumps({'a': [1, b'\x00', 'x'], 'b': (2.5, None, True)}, protocol=4)
        let p = b"\x80\x04\x95(\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]\x94(K\x01C\x01\x00\x94\x8c\x01x\x94e\x8c\x01b\x94G@\x04\x00\x00\x00\x00\x00\x00N\x88\x87\x94u.";
        let v = parse(p, &[]).unwrap();
        assert_eq!(
            v.get("a").unwrap().as_seq().unwrap(),
            &[Value::Int(1), Value::Bytes(vec![0]), Value::Str("x".into())]
        );
        assert_eq!(
            v.get("b").unwrap(),
            &Value::Tuple(vec![Value::Float(2.5), Value::None, Value::Bool(true)])
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let p = b"\x80\x04\x95,\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]";
        for cut in 0..p.len() {
            assert!(parse(&p[..cut], &[]).is_err());
        }
    }
}
