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

/// Deepest nesting of containers a pickle may build. Checkpoints and tokenizers nest a handful of levels;
/// the limit keeps recursive drops, clones and comparisons of [`Value`] off the end of the stack.
pub const MAX_DEPTH: u32 = 100;

/// Reads a pickle. `allowed` lists the `module.name` globals that may appear; any other is refused.
///
/// Untrusted input fails with an error rather than a panic or a huge allocation: every declared length
/// is checked against the bytes left, nesting is capped at [`MAX_DEPTH`], and copies made through the
/// memo (`BINGET`, `DUP`) are capped at 64 MiB plus 128 times the input size, so a "billion laughs"
/// pickle that shares one value over and over is refused instead of expanded.
pub fn parse(bytes: &[u8], allowed: &[&str]) -> anyhow::Result<Value> {
    Machine {
        bytes,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: BTreeMap::new(),
        allowed,
        copied: 0,
        copy_budget: (64 << 20) + 128 * bytes.len() as u64,
    }
    .run()
}

/// A value on the stack or in the memo, with its nesting depth and approximate heap size (bytes).
#[derive(Clone)]
struct Item {
    v: Value,
    depth: u32,
    size: u64,
}

const NODE: u64 = std::mem::size_of::<Value>() as u64;

impl Item {
    fn leaf(v: Value) -> Self {
        let extra = match &v {
            Value::Str(s) | Value::Global(s) => s.len() as u64,
            Value::Bytes(b) => b.len() as u64,
            _ => 0,
        };
        Item {
            v,
            depth: 0,
            size: NODE + extra,
        }
    }
}

/// Combines children into a container one level deeper.
fn node(children: Vec<Item>, build: impl FnOnce(Vec<Value>) -> Value) -> anyhow::Result<Item> {
    let depth = 1 + children.iter().map(|c| c.depth).max().unwrap_or(0);
    if depth > MAX_DEPTH {
        bail!("malformed pickle: values nested deeper than {MAX_DEPTH} levels");
    }
    let size = NODE + children.iter().map(|c| c.size).sum::<u64>();
    Ok(Item {
        v: build(children.into_iter().map(|c| c.v).collect()),
        depth,
        size,
    })
}

/// A short description of a value for error messages (never its whole contents).
fn kind(v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(_) => "a bool".into(),
        Value::Int(_) => "an int".into(),
        Value::Float(_) => "a float".into(),
        Value::Str(_) => "a string".into(),
        Value::Bytes(_) => "bytes".into(),
        Value::Tuple(_) => "a tuple".into(),
        Value::List(_) => "a list".into(),
        Value::Dict(_) => "a dict".into(),
        Value::Global(g) => format!("global {g}"),
        Value::Object { class, .. } => format!("an object of {class}"),
        Value::PersistentId(_) => "a persistent id".into(),
    }
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    marks: Vec<usize>,
    memo: BTreeMap<u64, Item>,
    allowed: &'a [&'a str],
    /// Bytes copied through the memo and `DUP` so far.
    copied: u64,
    copy_budget: u64,
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
    fn push(&mut self, v: Value) {
        self.stack.push(Item::leaf(v));
    }
    fn pop(&mut self) -> anyhow::Result<Item> {
        self.stack
            .pop()
            .context("malformed pickle: stack underflow")
    }
    fn pop_mark(&mut self) -> anyhow::Result<Vec<Item>> {
        let mark = self.marks.pop().context("malformed pickle: no MARK")?;
        if mark > self.stack.len() {
            bail!("malformed pickle: MARK beyond the stack");
        }
        Ok(self.stack.split_off(mark))
    }
    /// Charges copying `size` bytes against the copy budget (before anything is copied).
    fn charge(&mut self, size: u64) -> anyhow::Result<()> {
        self.copied = self.copied.saturating_add(size);
        if self.copied > self.copy_budget {
            bail!(
                "malformed pickle: shared values expand past {} MiB (a pickle bomb?)",
                self.copy_budget >> 20
            );
        }
        Ok(())
    }
    /// A copy of the top of the stack, charged first.
    fn copy_top(&mut self, what: &str) -> anyhow::Result<Item> {
        let size = self.top(what)?.size;
        self.charge(size)?;
        Ok(self.top(what)?.clone())
    }
    fn top(&self, what: &str) -> anyhow::Result<&Item> {
        self.stack
            .last()
            .with_context(|| format!("malformed pickle: {what} on empty stack"))
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
            let shown: String = full.chars().take(200).collect();
            bail!(
                "refusing pickle global `{shown}`: only {} may appear in this file",
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
    fn call(callable: Item, args: Item) -> anyhow::Result<Item> {
        let Value::Tuple(_) = args.v else {
            bail!(
                "malformed pickle: call arguments are {}, not a tuple",
                kind(&args.v)
            )
        };
        match callable.v {
            Value::Global(class) if class == "collections.OrderedDict" => {
                if !matches!(&args.v, Value::Tuple(a) if a.is_empty()) {
                    bail!("unsupported pickle: OrderedDict with arguments");
                }
                Ok(Item::leaf(Value::Dict(Vec::new())))
            }
            Value::Global(class) => node(vec![args], |mut v| {
                let Some(Value::Tuple(args)) = v.pop() else {
                    unreachable!("checked above")
                };
                Value::Object {
                    class,
                    args,
                    state: None,
                }
            }),
            other => bail!("malformed pickle: calling {}", kind(&other)),
        }
    }
    /// Adds key/value items to the dict `target`.
    fn set_items(target: &mut Item, items: Vec<Item>) -> anyhow::Result<()> {
        let Value::Dict(d) = &mut target.v else {
            bail!("malformed pickle: SETITEMS on {}", kind(&target.v))
        };
        if !items.len().is_multiple_of(2) {
            bail!("malformed pickle: odd number of dict items");
        }
        for it in &items {
            target.depth = target.depth.max(it.depth + 1);
            target.size += it.size;
        }
        if target.depth > MAX_DEPTH {
            bail!("malformed pickle: values nested deeper than {MAX_DEPTH} levels");
        }
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k.v, v.v));
        }
        Ok(())
    }
    /// Adds items to the list `target`.
    fn extend_list(target: Option<&mut Item>, items: Vec<Item>) -> anyhow::Result<()> {
        let Some(target) = target else {
            bail!("malformed pickle: APPEND on empty stack")
        };
        let Value::List(l) = &mut target.v else {
            bail!("malformed pickle: APPEND to {}", kind(&target.v))
        };
        for it in items {
            target.depth = target.depth.max(it.depth + 1);
            target.size += it.size;
            if target.depth > MAX_DEPTH {
                bail!("malformed pickle: values nested deeper than {MAX_DEPTH} levels");
            }
            l.push(it.v);
        }
        Ok(())
    }
    fn tuple(&mut self, items: Vec<Item>) -> anyhow::Result<()> {
        let t = node(items, Value::Tuple)?;
        self.stack.push(t);
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
                    // FRAME: a size hint, but one that must fit in what is left.
                    let n = self.u64()?;
                    self.len(n)?;
                }
                b'.' => return Ok(self.pop()?.v),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.push(Value::Dict(Vec::new())),
                b']' => self.push(Value::List(Vec::new())),
                b')' => self.push(Value::Tuple(Vec::new())),
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v.into()))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v.into()))
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
                    self.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8"));
                    self.push(Value::Float(v));
                }
                b'X' => {
                    let n = self.u32()? as u64;
                    let n = self.len(n)?;
                    let v = self.text(n)?;
                    self.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.u64()?;
                    let n = self.len(n)?;
                    let v = self.text(n)?;
                    self.push(v);
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(if op == b'U' {
                        Value::Str(String::from_utf8_lossy(&b).into_owned())
                    } else {
                        Value::Bytes(b)
                    });
                }
                b'T' | b'B' => {
                    let n = self.u32()? as u64;
                    let n = self.len(n)?;
                    let b = self.take(n)?.to_vec();
                    self.push(if op == b'T' {
                        Value::Str(String::from_utf8_lossy(&b).into_owned())
                    } else {
                        Value::Bytes(b)
                    });
                }
                0x8e => {
                    let n = self.u64()?;
                    let n = self.len(n)?;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b));
                }
                b'q' | b'r' | 0x94 => {
                    let i = match op {
                        b'q' => self.u8()? as u64,
                        b'r' => self.u32()? as u64,
                        _ => self.memo.len() as u64,
                    };
                    let v = self.copy_top("memo PUT")?;
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let size = self
                        .memo
                        .get(&i)
                        .with_context(|| format!("malformed pickle: memo {i} is empty"))?
                        .size;
                    self.charge(size)?;
                    let v = self.memo[&i].clone();
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(&module, &name)?;
                    self.push(g);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module.v.as_str(), name.v.as_str()) {
                        (Some(m), Some(n)) => {
                            let g = self.global(m, n)?;
                            self.push(g)
                        }
                        _ => bail!("malformed pickle: STACK_GLOBAL needs two strings"),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.tuple(items)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        bail!("malformed pickle: stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.tuple(items)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let l = node(items, Value::List)?;
                    self.stack.push(l);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let mut d = Item::leaf(Value::Dict(Vec::new()));
                    Self::set_items(&mut d, items)?;
                    self.stack.push(d);
                }
                b'a' => {
                    let v = self.pop()?;
                    Self::extend_list(self.stack.last_mut(), vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    Self::extend_list(self.stack.last_mut(), items)?;
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
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = Self::call(callable, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.stack.last_mut();
                    match target {
                        Some(Item {
                            v: Value::Object { state: s, .. },
                            depth,
                            size,
                        }) => {
                            *depth = (*depth).max(state.depth + 1);
                            if *depth > MAX_DEPTH {
                                bail!(
                                    "malformed pickle: values nested deeper than {MAX_DEPTH} levels"
                                );
                            }
                            *size += state.size;
                            *s = Some(Box::new(state.v))
                        }
                        Some(Item {
                            v: Value::Dict(_), ..
                        }) if state.v == Value::None => {}
                        Some(other) => bail!(
                            "malformed pickle: BUILD on {}, not an object",
                            kind(&other.v)
                        ),
                        None => bail!("malformed pickle: BUILD on empty stack"),
                    }
                }
                b'Q' => {
                    let id = self.pop()?;
                    let v = node(vec![id], |mut v| {
                        Value::PersistentId(Box::new(v.pop().expect("one child")))
                    })?;
                    self.stack.push(v);
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.copy_top("DUP")?;
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
    fn memo_bomb_is_refused_not_expanded() {
        // `x = []; x = (x, x)` sixty times through the memo: 2^60 nodes if every BINGET copied.
        let mut p = b"\x80\x04]\x94".to_vec();
        for i in 0..60u8 {
            p.extend_from_slice(&[b'h', i, b'h', i, 0x86, 0x94]);
        }
        p.push(b'.');
        let err = parse(&p, &[]).unwrap_err().to_string();
        assert!(err.contains("pickle bomb"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused_before_the_stack_overflows() {
        // 500,000 nested lists: dropping (or comparing, or printing) them recursively would overflow.
        let n = 500_000;
        let mut p = vec![b']'; n];
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        let err = parse(&p, &[]).unwrap_err().to_string();
        assert!(err.contains("nested deeper than 100"), "{err}");
        // Tuples, dicts and BUILD states count as levels too.
        let mut p = vec![b'N'];
        p.extend(std::iter::repeat_n(0x85, 200)); // TUPLE1
        p.push(b'.');
        assert!(parse(&p, &[]).is_err());
    }

    #[test]
    fn a_frame_larger_than_the_pickle_is_truncation() {
        // FRAME declaring 2^62 bytes used to be ignored (the rest then read as whatever followed).
        let mut p = b"\x80\x04\x95".to_vec();
        p.extend_from_slice(&(1u64 << 62).to_le_bytes());
        p.extend_from_slice(b"}.");
        let err = parse(&p, &[]).unwrap_err().to_string();
        assert!(err.contains("pickle is truncated"), "{err}");
    }

    #[test]
    fn errors_describe_values_without_printing_them() {
        // REDUCE on a 1 MB string: the message names the kind, not the contents.
        let mut p = vec![b'X'];
        p.extend_from_slice(&(1u32 << 20).to_le_bytes());
        p.extend(std::iter::repeat_n(b'x', 1 << 20));
        p.extend_from_slice(b")R.");
        let err = parse(&p, &[]).unwrap_err().to_string();
        assert!(err.contains("calling a string") && err.len() < 200, "{err}");
    }

    #[test]
    fn every_seed_parses_or_fails_as_named() {
        let tiktoken = ["tiktoken.core.Encoding"];
        for (name, bytes) in crate::models::gguf_check::fuzz_seeds("pickle") {
            let allowed: &[&str] = if name.starts_with("tok-") {
                &tiktoken
            } else {
                crate::models::torch_pt::ALLOWED
            };
            let r = parse(&bytes, allowed);
            let expect_err = ["evil-", "refused-", "unsupported-"]
                .iter()
                .any(|p| name.starts_with(p) || name.starts_with(&format!("tok-{p}")));
            assert_eq!(r.is_err(), expect_err, "{name}: {r:?}");
        }
    }

    #[test]
    fn fuzz_regressions_fail_cleanly() {
        for (name, bytes) in crate::models::gguf_check::fuzz_regressions("pickle") {
            let r = parse(&bytes, crate::models::torch_pt::ALLOWED);
            assert!(r.is_err(), "{name}: {r:?}");
        }
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let p = b"\x80\x04\x95,\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]";
        for cut in 0..p.len() {
            assert!(parse(&p[..cut], &[]).is_err());
        }
    }
}
