//! A pickle virtual machine for the pickles `torch.save` writes (`data.pkl` in its zip archive).
//!
//! It runs the opcodes of protocols 0–5 that Python's pickler emits for dicts, lists, tuples, scalars and strings,
//! and knows the few globals a state dict is built from (`torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, `collections.OrderedDict`, the `torch.*Storage` types). Every other global (a
//! Lightning callback, a numpy scalar, an optimizer class) becomes an opaque [`Value::Object`]: nothing is ever
//! imported or executed, and objects the caller does not ask for cannot break loading the ones it does.
//!
//! Tensors are not materialised here: a [`TensorRef`] only records storage key, offset, shape and strides; the
//! caller validates them against the archive and slices the bytes lazily.

use crate::graph::DType;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// The element type of a torch storage, from its class name (`torch.FloatStorage`, ...).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum StorageDType {
    Supported(DType),
    /// A storage zeroconv cannot compute in (bool, uint8, complex, float8): its tensors are skipped, not fatal.
    Unsupported {
        name: String,
        elem_size: Option<usize>,
    },
}

impl StorageDType {
    fn from_class(name: &str) -> StorageDType {
        let supported = match name {
            "FloatStorage" => Some(DType::F32),
            "HalfStorage" => Some(DType::F16),
            "BFloat16Storage" => Some(DType::BF16),
            "DoubleStorage" => Some(DType::F64),
            "LongStorage" => Some(DType::I64),
            "IntStorage" => Some(DType::I32),
            _ => None,
        };
        if let Some(d) = supported {
            return StorageDType::Supported(d);
        }
        let elem_size = match name {
            "BoolStorage" | "ByteStorage" | "CharStorage" | "UntypedStorage" => Some(1),
            "ShortStorage" => Some(2),
            "ComplexFloatStorage" => Some(8),
            "ComplexDoubleStorage" => Some(16),
            n if n.starts_with("Float8") => Some(1),
            _ => None,
        };
        // Named as torch names the dtype (torch.bool, torch.uint8 is "Byte" here, lower-cased).
        let name = name.strip_suffix("Storage").unwrap_or(name).to_ascii_lowercase();
        StorageDType::Unsupported { name, elem_size }
    }
}

/// A storage named by a persistent id `('storage', torch.XStorage, key, location, numel)`.
#[derive(Debug, PartialEq)]
pub(crate) struct StorageRef {
    /// The record name: the storage bytes are `<archive>/data/<key>`.
    pub key: String,
    pub dtype: StorageDType,
    /// Number of elements, as the pickle declares it.
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage.
#[derive(Debug, PartialEq)]
pub(crate) struct TensorRef {
    pub storage: Rc<StorageRef>,
    /// In elements of the storage's dtype.
    pub offset: u64,
    pub shape: Vec<u64>,
    pub strides: Vec<u64>,
}

#[derive(Clone, Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits (its value is never needed by a state dict).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    /// Bytes and bytearrays (their content is never needed by a state dict).
    Bytes,
    Tuple(Rc<[Value]>),
    /// Lists, sets and frozensets: shared and mutable, because APPENDS may run after the list was memoised.
    List(Rc<RefCell<Vec<Value>>>),
    /// Dicts and OrderedDicts in insertion order (a later SETITEM of an equal key wins when read).
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Rc<(String, String)>),
    /// An instance of a class this VM does not know, kept only by class name.
    Object(Rc<str>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    /// A short description for error messages: "a list", "an object of class foo.Bar".
    pub(crate) fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) | Value::BigInt => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(_) => "a string".into(),
            Value::Bytes => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(g) => format!("the global {}.{}", g.0, g.1),
            Value::Object(class) => format!("an object of class {class}"),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
        }
    }

    /// The text of a scalar (int, float, bool, string), as checkpoint metadata; `None` for anything else.
    pub(crate) fn scalar_text(&self) -> Option<String> {
        match self {
            Value::Bool(b) => Some(if *b { "true" } else { "false" }.into()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Str(s) => Some(s.to_string()),
            _ => None,
        }
    }

    fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
}

/// Runs the pickle in `data` and returns the object it builds.
pub(crate) fn unpickle(data: &[u8]) -> Result<Value, String> {
    Vm { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }.run()
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Vm<'a> {
    fn run(mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op =
                self.u8().map_err(|_| format!("the pickle ends at byte {at} without a STOP opcode: truncated?"))?;
            let done = self.step(op).map_err(|e| format!("opcode 0x{op:02x} at byte {at}: {e}"))?;
            if let Some(v) = done {
                return Ok(v);
            }
        }
    }

    /// Executes one opcode; returns the result once STOP is reached.
    fn step(&mut self, op: u8) -> Result<Option<Value>, String> {
        match op {
            0x80 => {
                self.u8()?; // PROTO: the version changes nothing for reading
            }
            0x95 => {
                self.take(8)?; // FRAME: a length hint; the framed opcodes follow inline
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Value::Global(Rc::new((module, name))));
            }
            0x93 => {
                let name = self.pop_str()?;
                let module = self.pop_str()?;
                self.push(Value::Global(Rc::new((module, name))));
            }
            b'q' => {
                let i = self.u8()? as u32;
                self.memoize(i)?;
            }
            b'r' => {
                let i = self.u32()?;
                self.memoize(i)?;
            }
            b'p' => {
                let i = self.line()?.parse::<u32>().map_err(|e| format!("PUT index: {e}"))?;
                self.memoize(i)?;
            }
            0x94 => {
                let i = self.memo.len() as u32;
                self.memoize(i)?;
            }
            b'h' => {
                let i = self.u8()? as u32;
                self.recall(i)?;
            }
            b'j' => {
                let i = self.u32()?;
                self.recall(i)?;
            }
            b'g' => {
                let i = self.line()?.parse::<u32>().map_err(|e| format!("GET index: {e}"))?;
                self.recall(i)?;
            }
            b'(' => self.marks.push(self.stack.len()),
            b'}' => self.push(Value::Dict(Rc::default())),
            b'd' => {
                let items = self.pop_mark()?;
                let dict = Value::Dict(Rc::default());
                set_items(&dict, items)?;
                self.push(dict);
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                set_items(self.top()?, vec![key, value])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                set_items(self.top()?, items)?;
            }
            b']' | 0x8f => self.push(Value::List(Rc::default())),
            b'l' | 0x91 => {
                let items = self.pop_mark()?;
                self.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b'a' => {
                let v = self.pop()?;
                append(self.top()?, vec![v])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                append(self.top()?, items)?;
            }
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::Tuple(items.into()));
            }
            b')' => self.push(Value::Tuple(Rc::new([]))),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack_len_above_mark() < n {
                    return Err("stack underflow".into());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.push(Value::Tuple(items.into()));
            }
            b'J' => {
                let b = self.take(4)?;
                self.push(Value::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64));
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v as i64));
            }
            b'M' => {
                let b = self.take(2)?;
                self.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
            }
            0x8a => {
                let n = self.u8()? as usize;
                let v = long_from_bytes(self.take(n)?);
                self.push(v);
            }
            0x8b => {
                let n = self.u32()? as usize;
                let v = long_from_bytes(self.take(n)?);
                self.push(v);
            }
            b'I' => {
                let text = self.line()?;
                let v = match text.as_str() {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    t => Value::Int(t.parse().map_err(|e| format!("INT {t:?}: {e}"))?),
                };
                self.push(v);
            }
            b'L' => {
                let text = self.line()?;
                let digits = text.strip_suffix('L').unwrap_or(&text);
                self.push(digits.parse().map(Value::Int).unwrap_or(Value::BigInt));
            }
            b'X' => {
                let n = self.u32()? as usize;
                let s = self.utf8(n)?;
                self.push(s);
            }
            0x8c => {
                let n = self.u8()? as usize;
                let s = self.utf8(n)?;
                self.push(s);
            }
            0x8d => {
                let n = self.u64_len()?;
                let s = self.utf8(n)?;
                self.push(s);
            }
            b'T' | b'U' => {
                // Python 2 byte strings, read as Latin-1 text like Python 3's default `encoding="ASCII"` would.
                let n = if op == b'T' { self.u32()? as usize } else { self.u8()? as usize };
                let s: String = self.take(n)?.iter().map(|&b| b as char).collect();
                self.push(Value::Str(s.into()));
            }
            b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'B' => self.u32()? as usize,
                    b'C' => self.u8()? as usize,
                    _ => self.u64_len()?,
                };
                self.take(n)?;
                self.push(Value::Bytes);
            }
            b'G' => {
                let b = self.take(8)?;
                self.push(Value::Float(f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])));
            }
            b'F' => {
                let text = self.line()?;
                self.push(Value::Float(text.parse().map_err(|e| format!("FLOAT {text:?}: {e}"))?));
            }
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'N' => self.push(Value::None),
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = call(&callable, args)?;
                self.push(v);
            }
            0x81 => {
                let args = self.pop()?;
                let class = self.pop()?;
                let v = call(&class, args)?;
                self.push(v);
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let class = self.pop()?;
                let v = call(&class, args)?;
                self.push(v);
            }
            b'o' => {
                let mut items = self.pop_mark()?;
                if items.is_empty() {
                    return Err("OBJ without a class".into());
                }
                let class = items.remove(0);
                let v = call(&class, Value::Tuple(items.into()))?;
                self.push(v);
            }
            b'i' => {
                let module = self.line()?;
                let name = self.line()?;
                let items = self.pop_mark()?;
                let v = call(&Value::Global(Rc::new((module, name))), Value::Tuple(items.into()))?;
                self.push(v);
            }
            b'b' => {
                // BUILD sets an object's state (`__setstate__`/`__dict__`). Tensors and dicts (an OrderedDict's
                // `_metadata`) keep nothing from it that a state dict needs, and opaque objects keep nothing at all.
                self.pop()?;
                self.top()?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = persistent_load(pid)?;
                self.push(v);
            }
            b'P' => {
                let pid = self.line()?;
                let v = persistent_load(Value::Str(pid.into()))?;
                self.push(v);
            }
            b'.' => return self.pop().map(Some),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push(v);
            }
            0x97 | 0x98 => return Err("out-of-band buffers (pickle protocol 5) are not used by torch.save".into()),
            _ => return Err("unknown or unsupported pickle opcode".into()),
        }
        Ok(None)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn stack_len_above_mark(&self) -> usize {
        self.stack.len() - self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Value, String> {
        if self.stack_len_above_mark() == 0 {
            return Err("stack underflow".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&self) -> Result<&Value, String> {
        self.stack.last().ok_or_else(|| "stack underflow".into())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self.marks.pop().ok_or("no MARK to pop to")?;
        Ok(self.stack.split_off(mark))
    }

    fn pop_str(&mut self) -> Result<String, String> {
        match self.pop()? {
            Value::Str(s) => Ok(s.to_string()),
            other => Err(format!("expected a string, found {}", other.describe())),
        }
    }

    fn memoize(&mut self, i: u32) -> Result<(), String> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn recall(&mut self, i: u32) -> Result<(), String> {
        let v = self.memo.get(&i).cloned().ok_or_else(|| format!("memo slot {i} was never set"))?;
        self.push(v);
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            format!("needs {n} more bytes but only {} remain: truncated?", self.data.len() - self.pos)
        })?;
        let data: &'a [u8] = self.data;
        let s = &data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64_len(&mut self) -> Result<usize, String> {
        let b = self.take(8)?;
        let n = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        usize::try_from(n).map_err(|_| format!("length {n} does not fit in memory"))
    }

    fn utf8(&mut self, n: usize) -> Result<Value, String> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|e| format!("string is not UTF-8: {e}"))?;
        Ok(Value::Str(s.into()))
    }

    /// A newline-terminated text argument (GLOBAL, PUT, INT, ...).
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("text argument without a newline: truncated?")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
}

/// LONG1/LONG4: little-endian two's complement of any width.
fn long_from_bytes(b: &[u8]) -> Value {
    if b.len() > 8 {
        return Value::BigInt;
    }
    if b.is_empty() {
        return Value::Int(0);
    }
    let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
    let mut buf = [fill; 8];
    buf[..b.len()].copy_from_slice(b);
    Value::Int(i64::from_le_bytes(buf))
}

fn set_items(target: &Value, items: Vec<Value>) -> Result<(), String> {
    let Value::Dict(dict) = target else {
        // SETITEMS on an opaque object (a custom mapping class): the items are not needed.
        return if matches!(target, Value::Object(_)) {
            Ok(())
        } else {
            Err(format!("SETITEMS on {}", target.describe()))
        };
    };
    if !items.len().is_multiple_of(2) {
        return Err("SETITEMS with an odd number of items".into());
    }
    let mut dict = dict.borrow_mut();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        dict.push((k, v));
    }
    Ok(())
}

fn append(target: &Value, items: Vec<Value>) -> Result<(), String> {
    match target {
        Value::List(list) => {
            list.borrow_mut().extend(items);
            Ok(())
        }
        // `extend` on an opaque list subclass: the items are not needed.
        Value::Object(_) => Ok(()),
        other => Err(format!("APPEND to {}", other.describe())),
    }
}

fn tuple_items(args: &Value) -> Result<&[Value], String> {
    match args {
        Value::Tuple(items) => Ok(items),
        other => Err(format!("arguments are {}, not a tuple", other.describe())),
    }
}

/// REDUCE / NEWOBJ: calls the few functions a state dict needs; everything else becomes an opaque object.
fn call(callable: &Value, args: Value) -> Result<Value, String> {
    call_nested(callable, args, 0)
}

/// Tensor subclasses wrap a rebuild call in another; a crafted pickle could nest them until the stack overflows.
const MAX_REBUILD_NESTING: usize = 8;

fn call_nested(callable: &Value, args: Value, depth: usize) -> Result<Value, String> {
    let Value::Global(global) = callable else {
        return Ok(Value::Object(format!("<result of calling {}>", callable.describe()).into()));
    };
    let (module, name) = (global.0.as_str(), global.1.as_str());
    match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor" | "_rebuild_tensor_v3") => rebuild_tensor(&args),
        // A Parameter pickles as (tensor, requires_grad, hooks[, state]): the tensor is all that matters.
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            tuple_items(&args)?.first().cloned().ok_or_else(|| format!("{name} without a tensor"))
        }
        // A tensor subclass: (rebuild function, subclass, its args, state).
        ("torch._tensor", "_rebuild_from_type_v2" | "_rebuild_from_type") => match tuple_items(&args)? {
            [_, _, _, ..] if depth >= MAX_REBUILD_NESTING => Err(format!("{name} nested too deeply")),
            [func, _class, inner, ..] => call_nested(func, inner.clone(), depth + 1),
            _ => Err(format!("{name} with too few arguments")),
        },
        ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict") => {
            let dict = Value::Dict(Rc::default());
            // OrderedDict([(k, v), ...]) or OrderedDict(): pairs may come as the first argument.
            if let Some(Value::List(pairs)) = tuple_items(&args)?.first() {
                for pair in pairs.borrow().iter() {
                    if let Value::Tuple(kv) = pair {
                        if let [k, v] = &kv[..] {
                            set_items(&dict, vec![k.clone(), v.clone()])?;
                        }
                    }
                }
            }
            Ok(dict)
        }
        _ => Ok(Value::Object(format!("{module}.{name}").into())),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`.
fn rebuild_tensor(args: &Value) -> Result<Value, String> {
    let items = tuple_items(args)?;
    let [storage, offset, size, stride, ..] = items else {
        return Err(format!("_rebuild_tensor_v2 with {} arguments, expected at least 4", items.len()));
    };
    let Value::Storage(storage) = storage else {
        return Err(format!("_rebuild_tensor_v2 on {}, not a storage", storage.describe()));
    };
    let dims = |v: &Value, what: &str| -> Result<Vec<u64>, String> {
        tuple_items(v)?
            .iter()
            .map(|d| d.as_int().and_then(|d| u64::try_from(d).ok()))
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| format!("tensor {what} is not a tuple of non-negative integers"))
    };
    let shape = dims(size, "size")?;
    let strides = dims(stride, "stride")?;
    if shape.len() != strides.len() {
        return Err(format!("tensor has {} sizes but {} strides", shape.len(), strides.len()));
    }
    let offset = offset.as_int().and_then(|o| u64::try_from(o).ok()).ok_or("tensor storage offset is not an int")?;
    Ok(Value::Tensor(Rc::new(TensorRef { storage: storage.clone(), offset, shape, strides })))
}

/// BINPERSID: torch.save names each storage `('storage', torch.XStorage, key, location, numel)`.
fn persistent_load(pid: Value) -> Result<Value, String> {
    let items = tuple_items(&pid).map_err(|_| format!("persistent id is {}, not a tuple", pid.describe()))?;
    match items {
        [Value::Str(tag), Value::Global(class), key, _location, numel] if &**tag == "storage" => {
            let key = match key {
                Value::Str(s) => s.to_string(),
                Value::Int(i) => i.to_string(),
                other => return Err(format!("storage key is {}", other.describe())),
            };
            let numel = numel.as_int().and_then(|n| u64::try_from(n).ok()).ok_or("storage size is not an int")?;
            let dtype = StorageDType::from_class(&class.1);
            Ok(Value::Storage(Rc::new(StorageRef { key, dtype, numel })))
        }
        _ => Err("persistent id is not ('storage', type, key, location, numel)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict_entries(v: &Value) -> Vec<(String, Value)> {
        let Value::Dict(d) = v else { panic!("not a dict: {}", v.describe()) };
        d.borrow()
            .iter()
            .map(|(k, v)| match k {
                Value::Str(s) => (s.to_string(), v.clone()),
                _ => panic!("non-string key"),
            })
            .collect()
    }

    #[test]
    fn memoised_containers_see_later_mutation() {
        // EMPTY_LIST, BINPUT 0, MARK, BININT1 1, BININT1 2, APPENDS, POP, BINGET 0, STOP:
        // the list is memoised before its items arrive; the recalled copy must contain them.
        let p = [b']', b'q', 0, b'(', b'K', 1, b'K', 2, b'e', b'0', b'h', 0, b'.'];
        let Value::List(l) = unpickle(&p).unwrap() else { panic!() };
        let items: Vec<i64> = l.borrow().iter().map(|v| v.as_int().unwrap()).collect();
        assert_eq!(items, vec![1, 2]);
    }

    #[test]
    fn scalars_and_strings() {
        // PROTO 2, EMPTY_DICT, MARK, "a" -> BINFLOAT 1.5, "b" -> LONG1 -2, "c" -> NEWTRUE, "d" -> BININT -7, SETITEMS
        let mut p = vec![0x80, 2, b'}', b'('];
        p.extend([0x8c, 1, b'a', b'G']);
        p.extend(1.5f64.to_be_bytes());
        p.extend([0x8c, 1, b'b', 0x8a, 1, 0xfe]);
        p.extend([0x8c, 1, b'c', 0x88]);
        p.extend([b'X', 1, 0, 0, 0, b'd', b'J']);
        p.extend((-7i32).to_le_bytes());
        p.extend([b'u', b'.']);
        let entries = dict_entries(&unpickle(&p).unwrap());
        let texts: Vec<(String, String)> = entries.iter().map(|(k, v)| (k.clone(), v.scalar_text().unwrap())).collect();
        let want = [("a", "1.5"), ("b", "-2"), ("c", "true"), ("d", "-7")];
        assert_eq!(texts, want.map(|(a, b)| (a.to_string(), b.to_string())));
    }

    #[test]
    fn unknown_globals_become_opaque_objects() {
        // GLOBAL 'pytorch_lightning.callbacks ModelCheckpoint', EMPTY_TUPLE, NEWOBJ, EMPTY_DICT, BUILD, STOP
        let mut p = b"cpytorch_lightning.callbacks\nModelCheckpoint\n".to_vec();
        p.extend([b')', 0x81, b'}', b'b', b'.']);
        match unpickle(&p).unwrap() {
            Value::Object(class) => assert_eq!(&*class, "pytorch_lightning.callbacks.ModelCheckpoint"),
            other => panic!("{}", other.describe()),
        }
    }

    #[test]
    fn rebuilds_a_tensor_from_a_persistent_storage() {
        // _rebuild_tensor_v2(('storage', torch.HalfStorage, '3', 'cpu', 6) as pid, 1, (2, 2), (1, 2), False, OrderedDict())
        let mut p = vec![0x80, 2];
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend(b"(X\x07\x00\x00\x00storagectorch\nHalfStorage\nX\x01\x00\x00\x003X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend([b'K', 1, b'K', 2, b'K', 2, 0x86, b'K', 1, b'K', 2, 0x86, 0x89]);
        p.extend(b"ccollections\nOrderedDict\n)R");
        p.extend([b't', b'R', b'.']);
        let Value::Tensor(t) = unpickle(&p).unwrap() else { panic!() };
        assert_eq!(t.storage.key, "3");
        assert_eq!(t.storage.dtype, StorageDType::Supported(DType::F16));
        assert_eq!(t.storage.numel, 6);
        assert_eq!((t.offset, t.shape.clone(), t.strides.clone()), (1, vec![2, 2], vec![1, 2]));
    }

    #[test]
    fn damaged_pickles_give_errors_not_panics() {
        assert!(unpickle(&[]).unwrap_err().contains("without a STOP"));
        assert!(unpickle(&[b'X', 0xff, 0xff, 0xff, 0x7f]).unwrap_err().contains("truncated?"));
        assert!(unpickle(&[b'h', 9, b'.']).unwrap_err().contains("memo slot 9"));
        assert!(unpickle(b".").unwrap_err().contains("stack underflow"));
        assert!(unpickle(b"(.").unwrap_err().contains("stack underflow"));
        assert!(unpickle(&[0xff]).unwrap_err().contains("unknown"));
        assert!(unpickle(&[b'K', 0, b'K', 1, b'K', 2, b's', b'.']).unwrap_err().contains("SETITEMS on an int"));
    }
}
