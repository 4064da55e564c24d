//! A small, non-executing pickle interpreter for `torch.save` archives.
//!
//! candle's `pickle::Stack` rejects dict subclasses built with `NEWOBJ` + `SETITEMS` (Lightning's
//! `AttributeDict`), copies memo entries before they are filled, knows no protocol 4/5 opcodes
//! and can panic on long `LONG1` integers. This reader keeps every value in an arena so memo
//! references stay shared (as in Python), turns unknown classes into generic objects instead of
//! failing, and never panics on malformed input.

use std::collections::HashMap;

/// Index of a value in [`Pickle::nodes`].
pub(crate) type Id = usize;

/// Location of one tensor's data inside a `torch.save` archive (`_rebuild_tensor_v2` arguments).
#[derive(Debug, Clone)]
pub(crate) struct TensorRef {
    /// Storage class name, e.g. `FloatStorage`.
    pub storage_type: String,
    /// Record name under `<archive>/data/`.
    pub storage_key: String,
    /// Elements in the storage.
    pub storage_numel: usize,
    /// Offset of the first element, in elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub stride: Vec<usize>,
}

/// One unpickled value. Containers refer to their items by [`Id`].
#[derive(Debug, Clone)]
pub(crate) enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    /// Also used for sets.
    List(Vec<Id>),
    Tuple(Vec<Id>),
    /// `dict`, `OrderedDict`, `defaultdict`; `state` holds instance attributes such as the
    /// `_metadata` of a PyTorch state dict.
    Dict {
        items: Vec<(Id, Id)>,
        state: Option<Id>,
    },
    /// A class or function reference (`GLOBAL`).
    Global {
        module: String,
        name: String,
    },
    /// An instance of a class we do not model; dict/list subclasses keep their items.
    Object {
        class: Id,
        args: Id,
        items: Vec<(Id, Id)>,
        list: Vec<Id>,
        state: Option<Id>,
    },
    PersistentId(Id),
    Tensor(TensorRef),
    /// A `_rebuild_tensor_v2` call whose arguments we could not interpret.
    BadTensor(String),
}

/// The value graph of one pickle stream.
#[derive(Debug, Default)]
pub(crate) struct Pickle {
    pub nodes: Vec<Node>,
    pub root: Id,
}

impl Pickle {
    /// Parses a complete pickle stream (up to `STOP`).
    pub fn parse(data: &[u8]) -> Result<Self, String> {
        let mut machine = Machine {
            input: data,
            pos: 0,
            nodes: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        };
        let root = machine.run()?;
        Ok(Pickle {
            nodes: machine.nodes,
            root,
        })
    }

    pub fn node(&self, id: Id) -> &Node {
        // Ids are only created by the parser, so they are always in range.
        &self.nodes[id]
    }

    /// The string value of `id`, if it is a string.
    pub fn str(&self, id: Id) -> Option<&str> {
        match self.node(id) {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The key/value pairs of a dict or of a dict-subclass instance.
    pub fn dict_items(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.node(id) {
            Node::Dict { items, .. } => Some(items),
            Node::Object { items, .. } if !items.is_empty() => Some(items),
            _ => None,
        }
    }

    /// Looks up a string key in a dict-like value.
    pub fn get(&self, id: Id, key: &str) -> Option<Id> {
        self.dict_items(id)?
            .iter()
            .find(|(k, _)| self.str(*k) == Some(key))
            .map(|(_, v)| *v)
    }

    /// `module.Class` of an object, or of a class reference.
    pub fn class_name(&self, id: Id) -> Option<String> {
        match self.node(id) {
            Node::Global { module, name } => Some(format!("{module}.{name}")),
            Node::Object { class, .. } => self.class_name(*class),
            _ => None,
        }
    }

    /// Converts a value to JSON for hyper-parameters. Unknown objects become strings, cycles and
    /// very deep nesting become `null`.
    pub fn to_json(&self, id: Id) -> serde_json::Value {
        self.to_json_depth(id, 0)
    }

    fn to_json_depth(&self, id: Id, depth: usize) -> serde_json::Value {
        use serde_json::Value;
        const MAX_DEPTH: usize = 64;
        if depth > MAX_DEPTH {
            return Value::Null;
        }
        let seq = |ids: &[Id]| {
            Value::Array(
                ids.iter()
                    .map(|&i| self.to_json_depth(i, depth + 1))
                    .collect(),
            )
        };
        let map = |items: &[(Id, Id)]| {
            let mut out = serde_json::Map::new();
            for &(k, v) in items {
                out.insert(self.key_string(k), self.to_json_depth(v, depth + 1));
            }
            Value::Object(out)
        };
        match self.node(id) {
            Node::None | Node::PersistentId(_) => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::from(*i),
            Node::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(f.to_string())),
            Node::Str(s) => Value::String(s.clone()),
            Node::Bytes(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
            Node::List(ids) | Node::Tuple(ids) => seq(ids),
            Node::Dict { items, .. } => map(items),
            Node::Global { module, name } => Value::String(format!("{module}.{name}")),
            Node::Tensor(t) => Value::String(format!("<tensor {:?}>", t.shape)),
            Node::BadTensor(_) => Value::String("<tensor>".to_string()),
            Node::Object {
                items,
                list,
                state,
                args,
                ..
            } => {
                if !items.is_empty() {
                    return map(items);
                }
                if !list.is_empty() {
                    return seq(list);
                }
                if let Some(state) = *state {
                    // OmegaConf containers keep their value in `_content`, leaf nodes in `_val`.
                    for key in ["_content", "_val"] {
                        if let Some(inner) = self.get(state, key) {
                            return self.to_json_depth(inner, depth + 1);
                        }
                    }
                    if let Some(items) = self.dict_items(state) {
                        return map(items);
                    }
                }
                let class = self.class_name(id).unwrap_or_else(|| "?".to_string());
                match self.node(*args) {
                    // e.g. torch.device('cpu'): keep the single string argument
                    Node::Tuple(a) if a.len() == 1 && self.str(a[0]).is_some() => {
                        Value::String(self.str(a[0]).unwrap_or_default().to_string())
                    }
                    _ => Value::String(format!("<{class} object>")),
                }
            }
        }
    }

    fn key_string(&self, id: Id) -> String {
        match self.node(id) {
            Node::Str(s) => s.clone(),
            Node::Int(i) => i.to_string(),
            Node::Float(f) => f.to_string(),
            Node::Bool(b) => if *b { "True" } else { "False" }.to_string(),
            Node::None => "None".to_string(),
            _ => match self.to_json_depth(id, 0) {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            },
        }
    }
}

/// The pickle virtual machine: a value stack, a mark stack (positions into the value stack) and
/// the memo.
struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

/// `torch._utils` functions that rebuild a tensor from a storage reference.
const REBUILD_TENSOR: [&str; 2] = ["_rebuild_tensor_v2", "_rebuild_tensor"];

impl Machine<'_> {
    fn run(&mut self) -> Result<Id, String> {
        loop {
            let at = self.pos;
            let op = self.byte()?;
            match self.step(op) {
                Ok(true) => return self.pop().map_err(|e| format!("at STOP: {e}")),
                Ok(false) => {}
                Err(e) => return Err(format!("pickle opcode 0x{op:02x} at byte {at}: {e}")),
            }
        }
    }

    fn add(&mut self, node: Node) -> Id {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn push(&mut self, node: Node) {
        let id = self.add(node);
        self.stack.push(id);
    }

    fn pop(&mut self) -> Result<Id, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("stack underflow".to_string());
        }
        self.stack
            .pop()
            .ok_or_else(|| "stack underflow".to_string())
    }

    fn top(&self) -> Result<Id, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("stack underflow".to_string());
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| "stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, String> {
        let mark = self.marks.pop().ok_or("MARK missing")?;
        if mark > self.stack.len() {
            return Err("MARK beyond the stack".to_string());
        }
        Ok(self.stack.split_off(mark))
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.input.len())
            .ok_or_else(|| format!("needs {n} more bytes but the stream ends (truncated?)"))?;
        let out = &self.input[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len_u32(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.le::<4>()?) as usize)
    }

    fn len_u64(&mut self) -> Result<usize, String> {
        usize::try_from(u64::from_le_bytes(self.le::<8>()?)).map_err(|e| e.to_string())
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.input[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated text argument")?;
        let text = String::from_utf8_lossy(&rest[..n])
            .trim_end_matches('\r')
            .to_string();
        self.pos += n + 1;
        Ok(text)
    }

    fn utf8(&mut self, n: usize) -> Result<Node, String> {
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|e| format!("invalid UTF-8 string: {e}"))?;
        Ok(Node::Str(s.to_string()))
    }

    fn bytes(&mut self, n: usize) -> Result<Node, String> {
        Ok(Node::Bytes(self.take(n)?.to_vec()))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), String> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| format!("memo entry {key} missing"))?;
        self.stack.push(id);
        Ok(())
    }

    fn parse_line<T: std::str::FromStr>(&mut self) -> Result<T, String> {
        let line = self.line()?;
        line.trim()
            .trim_end_matches('L')
            .parse()
            .map_err(|_| format!("bad number {line:?}"))
    }

    /// Executes one opcode; `Ok(true)` at `STOP`.
    fn step(&mut self, op: u8) -> Result<bool, String> {
        match op {
            0x80 => {
                self.byte()?; // PROTO
            }
            0x95 => {
                self.le::<8>()?; // FRAME: only a read-ahead hint
            }
            b'.' => return Ok(true),
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                if self.stack.len() <= self.marks.last().copied().unwrap_or(0)
                    && !self.marks.is_empty()
                {
                    self.pop_mark()?;
                } else {
                    self.pop()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let id = self.top()?;
                self.stack.push(id);
            }
            b'N' => self.push(Node::None),
            0x88 => self.push(Node::Bool(true)),
            0x89 => self.push(Node::Bool(false)),
            b'K' => {
                let v = self.byte()?;
                self.push(Node::Int(v.into()))
            }
            b'M' => {
                let v = u16::from_le_bytes(self.le::<2>()?);
                self.push(Node::Int(v.into()))
            }
            b'J' => {
                let v = i32::from_le_bytes(self.le::<4>()?);
                self.push(Node::Int(v.into()))
            }
            0x8a => {
                let n = self.byte()? as usize;
                let node = long_from_le(self.take(n)?);
                self.push(node)
            }
            0x8b => {
                let n = self.len_u32()?;
                let node = long_from_le(self.take(n)?);
                self.push(node)
            }
            b'I' => {
                let line = self.line()?;
                let node = match line.trim() {
                    "00" => Node::Bool(false),
                    "01" => Node::Bool(true),
                    t => Node::Int(t.parse().map_err(|_| format!("bad INT {line:?}"))?),
                };
                self.push(node)
            }
            b'L' => {
                let line = self.line()?;
                let t = line.trim().trim_end_matches('L');
                let node = match t.parse::<i64>() {
                    Ok(v) => Node::Int(v),
                    Err(_) => Node::Float(t.parse().map_err(|_| format!("bad LONG {line:?}"))?),
                };
                self.push(node)
            }
            b'G' => {
                // Floats are big-endian, unlike everything else in pickle.
                let v = f64::from_be_bytes(self.le::<8>()?);
                self.push(Node::Float(v))
            }
            b'F' => {
                let v: f64 = self.parse_line()?;
                self.push(Node::Float(v))
            }
            b'X' => {
                let n = self.len_u32()?;
                let node = self.utf8(n)?;
                self.push(node)
            }
            0x8c => {
                let n = self.byte()? as usize;
                let node = self.utf8(n)?;
                self.push(node)
            }
            0x8d => {
                let n = self.len_u64()?;
                let node = self.utf8(n)?;
                self.push(node)
            }
            b'V' => {
                let line = self.line()?;
                self.push(Node::Str(line))
            }
            b'S' => {
                let line = self.line()?;
                let t = line.trim();
                let unquoted = t
                    .strip_prefix('\'')
                    .and_then(|s| s.strip_suffix('\''))
                    .or_else(|| t.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                    .unwrap_or(t);
                self.push(Node::Str(unquoted.to_string()))
            }
            b'T' | b'B' => {
                let n = self.len_u32()?;
                let node = self.bytes(n)?;
                self.push(node)
            }
            b'U' | b'C' => {
                let n = self.byte()? as usize;
                let node = self.bytes(n)?;
                self.push(node)
            }
            0x8e | 0x96 => {
                let n = self.len_u64()?;
                let node = self.bytes(n)?;
                self.push(node)
            }
            b']' | 0x8f => self.push(Node::List(Vec::new())),
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Node::List(items))
            }
            0x91 => {
                let items = self.pop_mark()?;
                self.push(Node::List(items))
            }
            b')' => self.push(Node::Tuple(Vec::new())),
            b't' => {
                let items = self.pop_mark()?;
                self.push(Node::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Node::Tuple(items))
            }
            b'}' => self.push(Node::Dict {
                items: Vec::new(),
                state: None,
            }),
            b'd' => {
                let flat = self.pop_mark()?;
                let items = pairs(&flat)?;
                self.push(Node::Dict { items, state: None })
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                let target = self.top()?;
                self.set_items(target, vec![(key, value)])?
            }
            b'u' => {
                let flat = self.pop_mark()?;
                let items = pairs(&flat)?;
                let target = self.top()?;
                self.set_items(target, items)?
            }
            b'a' => {
                let value = self.pop()?;
                let target = self.top()?;
                self.append(target, vec![value])?
            }
            b'e' | 0x90 => {
                let values = self.pop_mark()?;
                let target = self.top()?;
                self.append(target, values)?
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Node::Global { module, name })
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Node::Str(module), Node::Str(name)) = (&self.nodes[module], &self.nodes[name])
                else {
                    return Err("STACK_GLOBAL needs two strings".to_string());
                };
                let node = Node::Global {
                    module: module.clone(),
                    name: name.clone(),
                };
                self.push(node)
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let node = self.call(callable, args);
                self.push(node)
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let class = self.pop()?;
                let node = self.call(class, args);
                self.push(node)
            }
            b'i' => {
                let module = self.line()?;
                let name = self.line()?;
                let args = self.pop_mark()?;
                let class = self.add(Node::Global { module, name });
                let args = self.add(Node::Tuple(args));
                let node = self.call(class, args);
                self.push(node)
            }
            b'o' => {
                let mut items = self.pop_mark()?;
                if items.is_empty() {
                    return Err("OBJ without a class".to_string());
                }
                let class = items.remove(0);
                let args = self.add(Node::Tuple(items));
                let node = self.call(class, args);
                self.push(node)
            }
            b'b' => {
                let state = self.pop()?;
                let target = self.top()?;
                match &mut self.nodes[target] {
                    Node::Dict { state: slot, .. } | Node::Object { state: slot, .. } => {
                        *slot = Some(state)
                    }
                    // Tensors and plain values carry nothing we need in their state.
                    _ => {}
                }
            }
            b'p' => {
                let key: u64 = self.parse_line()?;
                self.memo_put(key)?
            }
            b'q' => {
                let key = self.byte()?;
                self.memo_put(key.into())?
            }
            b'r' => {
                let key = u32::from_le_bytes(self.le::<4>()?);
                self.memo_put(key.into())?
            }
            0x94 => {
                let key = self.memo.len() as u64;
                self.memo_put(key)?
            }
            b'g' => {
                let key: u64 = self.parse_line()?;
                self.memo_get(key)?
            }
            b'h' => {
                let key = self.byte()?;
                self.memo_get(key.into())?
            }
            b'j' => {
                let key = u32::from_le_bytes(self.le::<4>()?);
                self.memo_get(key.into())?
            }
            b'P' => {
                let id = self.line()?;
                let id = self.add(Node::Str(id));
                self.push(Node::PersistentId(id))
            }
            b'Q' => {
                let id = self.pop()?;
                self.push(Node::PersistentId(id))
            }
            0x82..=0x84 => return Err("extension registry codes are not supported".to_string()),
            0x97 | 0x98 => return Err("out-of-band buffers are not supported".to_string()),
            other => return Err(format!("unknown opcode 0x{other:02x} (not a pickle?)")),
        }
        Ok(false)
    }

    fn set_items(&mut self, target: Id, new: Vec<(Id, Id)>) -> Result<(), String> {
        match &mut self.nodes[target] {
            Node::Dict { items, .. } | Node::Object { items, .. } => {
                items.extend(new);
                Ok(())
            }
            _ => Err("SETITEM on a value that is not a dict".to_string()),
        }
    }

    fn append(&mut self, target: Id, values: Vec<Id>) -> Result<(), String> {
        match &mut self.nodes[target] {
            Node::List(items) | Node::Object { list: items, .. } => {
                items.extend(values);
                Ok(())
            }
            _ => Err("APPEND on a value that is not a list".to_string()),
        }
    }

    fn tuple_items(&self, id: Id) -> &[Id] {
        match &self.nodes[id] {
            Node::Tuple(items) | Node::List(items) => items,
            _ => &[],
        }
    }

    /// `callable(*args)` for the few callables whose result we model; anything else becomes an
    /// opaque [`Node::Object`].
    fn call(&mut self, callable: Id, args: Id) -> Node {
        let (module, name) = match &self.nodes[callable] {
            Node::Global { module, name } => (module.as_str(), name.as_str()),
            _ => ("", ""),
        };
        let arg_ids = self.tuple_items(args).to_vec();
        match (module, name) {
            ("collections", "OrderedDict" | "defaultdict")
            | ("builtins" | "__builtin__", "dict") => {
                // OrderedDict([(k, v), ...]) from protocol 0/1 streams.
                let mut items = Vec::new();
                if let (Some(&first), "OrderedDict" | "dict") = (arg_ids.first(), name) {
                    for &pair in self.tuple_items(first) {
                        if let [k, v] = self.tuple_items(pair) {
                            items.push((*k, *v));
                        }
                    }
                }
                Node::Dict { items, state: None }
            }
            ("torch._utils", n) if REBUILD_TENSOR.contains(&n) => match self.tensor_ref(&arg_ids) {
                Ok(t) => Node::Tensor(t),
                Err(e) => Node::BadTensor(e),
            },
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match arg_ids.first() {
                    Some(&data) => self.nodes[data].clone(),
                    None => Node::BadTensor("parameter without data".to_string()),
                }
            }
            ("torch._tensor", "_rebuild_from_type_v2") => match arg_ids.as_slice() {
                [func, _type, func_args, ..] => self.call(*func, *func_args),
                _ => Node::BadTensor("malformed _rebuild_from_type_v2".to_string()),
            },
            ("builtins" | "__builtin__", "set" | "frozenset" | "list" | "tuple") => {
                let items = arg_ids
                    .first()
                    .map(|&i| self.tuple_items(i).to_vec())
                    .unwrap_or_default();
                Node::List(items)
            }
            ("torch", "Size") => {
                let items = arg_ids
                    .first()
                    .map(|&i| self.tuple_items(i).to_vec())
                    .unwrap_or_default();
                Node::Tuple(items)
            }
            ("_codecs", "encode") => match arg_ids.first().map(|&i| &self.nodes[i]) {
                // Protocol 2 writes `bytes` as `_codecs.encode(text, 'latin1')`.
                Some(Node::Str(s)) => Node::Bytes(s.chars().map(|c| c as u32 as u8).collect()),
                _ => Node::Bytes(Vec::new()),
            },
            _ => Node::Object {
                class: callable,
                args,
                items: Vec::new(),
                list: Vec::new(),
                state: None,
            },
        }
    }

    /// Interprets `(storage, storage_offset, size, stride, ...)`.
    fn tensor_ref(&self, args: &[Id]) -> Result<TensorRef, String> {
        let [storage, offset, size, stride, ..] = args else {
            return Err(format!("_rebuild_tensor_v2 with {} arguments", args.len()));
        };
        let Node::PersistentId(pid) = &self.nodes[*storage] else {
            return Err("tensor storage is not a persistent reference".to_string());
        };
        // ('storage', torch.FloatStorage, '0', 'cpu', numel)
        let pid = self.tuple_items(*pid);
        let [_tag, class, key, _location, numel, ..] = pid else {
            return Err("unexpected storage reference layout".to_string());
        };
        let storage_type = match &self.nodes[*class] {
            Node::Global { name, .. } => name.clone(),
            _ => return Err("storage type is not a class".to_string()),
        };
        let storage_key = match &self.nodes[*key] {
            Node::Str(s) => s.clone(),
            Node::Int(i) => i.to_string(),
            _ => return Err("storage key is not a string".to_string()),
        };
        Ok(TensorRef {
            storage_type,
            storage_key,
            storage_numel: self.usize_of(*numel)?,
            offset: self.usize_of(*offset)?,
            shape: self.usizes(*size)?,
            stride: self.usizes(*stride)?,
        })
    }

    fn usize_of(&self, id: Id) -> Result<usize, String> {
        match &self.nodes[id] {
            Node::Int(i) => usize::try_from(*i).map_err(|_| format!("negative size {i}")),
            _ => Err("expected an integer".to_string()),
        }
    }

    fn usizes(&self, id: Id) -> Result<Vec<usize>, String> {
        match &self.nodes[id] {
            Node::Tuple(items) | Node::List(items) => {
                items.iter().map(|&i| self.usize_of(i)).collect()
            }
            _ => Err("expected a tuple of integers".to_string()),
        }
    }
}

/// Two's-complement little-endian integer (`LONG1`/`LONG4`); values beyond `i64` become floats.
fn long_from_le(bytes: &[u8]) -> Node {
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let sign_byte = if negative { 0xff } else { 0x00 };
    if bytes.len() <= 8 || bytes[8..].iter().all(|&b| b == sign_byte) {
        let mut buf = [sign_byte; 8];
        let n = bytes.len().min(8);
        buf[..n].copy_from_slice(&bytes[..n]);
        let v = i64::from_le_bytes(buf);
        // Only trust the value if its sign agrees with the encoded sign.
        if (v < 0) == negative {
            return Node::Int(v);
        }
    }
    let mut v = 0f64;
    for &b in bytes.iter().rev() {
        let digit = if negative { !b } else { b };
        v = v * 256.0 + f64::from(digit);
    }
    Node::Float(if negative { -(v + 1.0) } else { v })
}

fn pairs(flat: &[Id]) -> Result<Vec<(Id, Id)>, String> {
    if !flat.len().is_multiple_of(2) {
        return Err("odd number of items for a dict".to_string());
    }
    Ok(flat.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Pickle {
        Pickle::parse(bytes).expect("valid pickle")
    }

    #[test]
    fn attribute_dict_subclass_keeps_items() {
        // pickle.dumps({'hp': AttributeDict(a=1, b=[1, 2])}, protocol=2)
        let bytes = b"\x80\x02}q\x00X\x02\x00\x00\x00hpq\x01c__main__\nAttributeDict\nq\x02)\x81q\x03(X\x01\x00\x00\x00aq\x04K\x01X\x01\x00\x00\x00bq\x05]q\x06(K\x01K\x02eus.";
        let p = parse(bytes);
        let hp = p.get(p.root, "hp").expect("hp key");
        assert_eq!(p.to_json(hp), serde_json::json!({"a": 1, "b": [1, 2]}));
    }

    #[test]
    fn memo_references_are_shared() {
        // x = []; {'a': x, 'b': x} after x.append(1): the memo must see the appended item.
        let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01K\x01aX\x01\x00\x00\x00bh\x01u.";
        let p = parse(bytes);
        assert_eq!(p.to_json(p.root), serde_json::json!({"a": [1], "b": [1]}));
    }

    #[test]
    fn protocol4_strings_and_frames() {
        // pickle.dumps({'k': 'v', 'n': None, 'f': 0.5, 't': True}, protocol=4)
        let bytes = b"\x80\x04\x95$\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01k\x94\x8c\x01v\x94\x8c\x01n\x94N\x8c\x01f\x94G?\xe0\x00\x00\x00\x00\x00\x00\x8c\x01t\x94\x88u.";
        let p = parse(bytes);
        assert_eq!(
            p.to_json(p.root),
            serde_json::json!({"k": "v", "n": null, "f": 0.5, "t": true})
        );
    }

    #[test]
    fn long_integers() {
        assert!(matches!(long_from_le(&[]), Node::Int(0)));
        assert!(matches!(long_from_le(&[0xff]), Node::Int(-1)));
        assert!(matches!(
            long_from_le(&[0x00, 0x80, 0x00]),
            Node::Int(32768)
        ));
        assert!(matches!(long_from_le(&[0xff; 40]), Node::Int(-1)));
        let Node::Float(big) = long_from_le(&[0, 0, 0, 0, 0, 0, 0, 0, 1]) else {
            panic!("expected float")
        };
        assert_eq!(big, 2f64.powi(64));
    }

    #[test]
    fn malformed_streams_are_errors() {
        for bad in [
            &b""[..],
            b"\x80",
            b"\x80\x02X\xff\xff\xff\x7f",
            b"\x80\x02s.",
            b"\x80\x02(u.",
            b"\x80\x02h\x07.",
            b"\x80\x02\xfe",
            b"\x80\x02K\x01K\x01s.",
            b"\x80\x02\x8a\xff\x00",
            b"\x80\x02(\x00\x00\x00\x00",
        ] {
            assert!(Pickle::parse(bad).is_err(), "{bad:?}");
        }
    }
}
