//! PyTorch's `torch.save` files (`.pth`), read and written without Python: a zip archive holding
//! a pickle (`<archive>/data.pkl`) whose tensors point at raw storages (`<archive>/data/<key>`).
//!
//! Reading runs a pickle machine that knows only what a saved state dict needs: containers,
//! numbers, strings (also in protocol 0's text opcodes, Python 2's default: plain-data pickles
//! such as RefCOCO's `refs(unc).p` are read too), and the few globals that rebuild tensors (`torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, the `torch.*Storage` types, `collections.OrderedDict`). Any
//! other global (`os.system`, `builtins.eval`, a class of the saving program) is refused when the
//! pickle names it, before anything is called: a checkpoint is data, never code. Every length in
//! the file is checked against the bytes that are there before anything is allocated.

use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use tch::{Kind, Tensor};

/// A value of the pickle: what a saved state dict is made of.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Dicts keep their order (an `OrderedDict` is one too).
    Dict(Vec<(Value, Value)>),
    Tensor(TensorRef),
    /// A storage the file holds: its key in `data/`, dtype and length.
    Storage {
        key: String,
        kind: Kind,
        numel: i64,
    },
    /// An allowed global, until it is called.
    Global(Allowed),
}

/// The globals the reader lets a pickle name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(Kind),
}

/// A tensor of the file: a view of a storage.
#[derive(Clone, Debug)]
pub struct TensorRef {
    pub storage: String,
    pub kind: Kind,
    pub storage_numel: i64,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

fn allowed(module: &str, name: &str) -> Option<Allowed> {
    let storage = |kind| Some(Allowed::Storage(kind));
    match (module, name) {
        ("collections", "OrderedDict") => Some(Allowed::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Allowed::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Some(Allowed::RebuildParameter),
        ("torch", "FloatStorage") => storage(Kind::Float),
        ("torch", "DoubleStorage") => storage(Kind::Double),
        ("torch", "HalfStorage") => storage(Kind::Half),
        ("torch", "BFloat16Storage") => storage(Kind::BFloat16),
        ("torch", "LongStorage") => storage(Kind::Int64),
        ("torch", "IntStorage") => storage(Kind::Int),
        ("torch", "ShortStorage") => storage(Kind::Int16),
        ("torch", "CharStorage") => storage(Kind::Int8),
        ("torch", "ByteStorage") => storage(Kind::Uint8),
        ("torch", "BoolStorage") => storage(Kind::Bool),
        _ => None,
    }
}

fn storage_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "FloatStorage",
        Kind::Double => "DoubleStorage",
        Kind::Half => "HalfStorage",
        Kind::BFloat16 => "BFloat16Storage",
        Kind::Int64 => "LongStorage",
        Kind::Int => "IntStorage",
        Kind::Int16 => "ShortStorage",
        Kind::Int8 => "CharStorage",
        Kind::Uint8 => "ByteStorage",
        Kind::Bool => "BoolStorage",
        other => bail!("no torch storage type for {other:?}"),
    })
}

/// Clips an untrusted string for an error message.
fn clip(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Runs the pickle `bytes` with the restricted machine; returns the object it builds.
pub fn unpickle(bytes: &[u8]) -> Result<Value> {
    let mut m = Machine { bytes, pos: 0, stack: vec![], marks: vec![], memo: BTreeMap::new() };
    m.run()
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: BTreeMap<u64, Value>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        ensure!(n <= self.bytes.len() - self.pos, "the pickle ends inside an opcode (at byte {})", self.pos);
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> Result<u64> {
        Ok(self.take(n)?.iter().rev().fold(0u64, |v, &b| (v << 8) | u64::from(b)))
    }

    /// The bytes up to the next newline, which is consumed.
    fn line_bytes(&mut self) -> Result<&[u8]> {
        let rest = &self.bytes[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').context("the pickle ends inside a text opcode")?;
        self.pos += end + 1;
        Ok(&rest[..end])
    }

    fn line(&mut self) -> Result<String> {
        Ok(std::str::from_utf8(self.line_bytes()?).context("a text opcode that is not UTF-8")?.to_string())
    }

    /// A memo key of PUT or GET: a decimal line.
    fn decimal(&mut self) -> Result<u64> {
        let line = self.line()?;
        line.parse().with_context(|| format!("a memo key {:?} that is not a number", clip(&line)))
    }

    fn text(&mut self, n: usize) -> Result<String> {
        Ok(std::str::from_utf8(self.take(n)?).context("a string that is not UTF-8")?.to_string())
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().context("the pickle pops an empty stack")
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().context("the pickle reads an empty stack")
    }

    /// The items pushed since the last MARK.
    fn since_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self.marks.pop().context("the pickle closes a MARK it never opened")?;
        ensure!(mark <= self.stack.len(), "a MARK past the top of the stack");
        Ok(self.stack.split_off(mark))
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        match allowed(module, name) {
            Some(g) => {
                self.stack.push(Value::Global(g));
                Ok(())
            }
            None => bail!(
                "the pickle calls {}.{}: refused (a checkpoint may only rebuild tensors, dicts and storages)",
                clip(module),
                clip(name)
            ),
        }
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let version = self.u8()?;
                    ensure!(version <= 5, "pickle protocol {version}");
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint
                }
                b'.' => return self.pop(),
                b'q' | b'r' | 0x94 | b'h' | b'j' | b'p' | b'g' => self.memo(op)?,
                b'(' | b'}' | b']' | b')' | b't' | 0x85..=0x87 | b'a' | b'e' | b's' | b'u' | b'l' | b'd' => {
                    self.container(op)?
                }
                b'c' | 0x93 | b'R' | 0x81 | b'b' | b'Q' => self.object(op)?,
                _ => {
                    let v = self.scalar(op)?;
                    self.stack.push(v);
                }
            }
        }
    }

    /// The opcodes that push a constant.
    fn scalar(&mut self, op: u8) -> Result<Value> {
        Ok(match op {
            b'N' => Value::None,
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'K' => Value::Int(self.le(1)? as i64),
            b'M' => Value::Int(self.le(2)? as i64),
            b'J' => Value::Int(i64::from(self.le(4)? as u32 as i32)),
            0x8a => {
                let n = usize::from(self.u8()?);
                ensure!(n <= 8, "an integer of {n} bytes");
                let raw = self.le(n)?;
                let negative = n > 0 && n < 8 && raw >> (8 * n - 1) & 1 == 1;
                Value::Int(if negative { raw | (!0u64 << (8 * n)) } else { raw } as i64)
            }
            b'G' => Value::Float(f64::from_bits(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))),
            b'X' => {
                let n = self.le(4)? as usize;
                Value::Str(self.text(n)?)
            }
            0x8c => {
                let n = usize::from(self.u8()?);
                Value::Str(self.text(n)?)
            }
            b'U' | b'C' => {
                let n = usize::from(self.u8()?);
                Value::Bytes(self.take(n)?.to_vec())
            }
            b'T' | b'B' => {
                let n = self.le(4)? as usize;
                Value::Bytes(self.take(n)?.to_vec())
            }
            b'I' | b'L' | b'F' | b'S' | b'V' => self.text_scalar(op)?,
            other => bail!("pickle opcode 0x{other:02x} is not one a saved state dict uses"),
        })
    }

    /// Protocol 0's constants, each a line of text: INT (`I01`/`I00` are Python 2's booleans),
    /// LONG (`12L`), FLOAT (repr), STRING (a byte string's repr) and UNICODE (raw-unicode-escape).
    fn text_scalar(&mut self, op: u8) -> Result<Value> {
        if op == b'V' {
            return Ok(Value::Str(raw_unicode_unescape(self.line_bytes()?)));
        }
        let line = self.line()?;
        let int = |s: &str| s.parse::<i64>().with_context(|| format!("an integer {:?} out of range", clip(s)));
        Ok(match op {
            b'I' if line == "01" => Value::Bool(true),
            b'I' if line == "00" => Value::Bool(false),
            b'I' => Value::Int(int(&line)?),
            b'L' => Value::Int(int(line.strip_suffix('L').unwrap_or(&line))?),
            b'F' => Value::Float(line.parse().with_context(|| format!("a FLOAT {:?}", clip(&line)))?),
            _ => Value::Bytes(unrepr(&line)?),
        })
    }

    /// The memo: BINPUT, LONG_BINPUT and MEMOIZE store the top of the stack, BINGET and
    /// LONG_BINGET push a stored value. The memo holds copies: a container read back after it
    /// was filled in would come back as it was when memoised. State dicts never read one back;
    /// storages and tensors, which they do share, do not change.
    fn memo(&mut self, op: u8) -> Result<()> {
        match op {
            b'h' | b'j' | b'g' => {
                let k = match op {
                    b'h' => self.le(1)?,
                    b'j' => self.le(4)?,
                    _ => self.decimal()?,
                };
                let v = self.memo.get(&k).with_context(|| format!("the pickle reads memo {k}, never written"))?;
                self.stack.push(v.clone());
            }
            _ => {
                let k = match op {
                    b'q' => self.le(1)?,
                    b'r' => self.le(4)?,
                    b'p' => self.decimal()?,
                    _ => self.memo.len() as u64,
                };
                let v = self.top()?.clone();
                self.memo.insert(k, v);
            }
        }
        Ok(())
    }

    /// The opcodes that build lists, tuples and dicts.
    fn container(&mut self, op: u8) -> Result<()> {
        match op {
            b'(' => self.marks.push(self.stack.len()),
            b'}' => self.stack.push(Value::Dict(vec![])),
            b']' => self.stack.push(Value::List(vec![])),
            b')' => self.stack.push(Value::Tuple(vec![])),
            b't' => {
                let items = self.since_mark()?;
                self.stack.push(Value::Tuple(items));
            }
            b'l' => {
                let items = self.since_mark()?;
                self.stack.push(Value::List(items));
            }
            b'd' => {
                let items = self.since_mark()?;
                ensure!(items.len() % 2 == 0, "DICT with an odd number of items");
                let mut items = items.into_iter();
                let pairs = std::iter::from_fn(|| Some((items.next()?, items.next()?)));
                self.stack.push(Value::Dict(pairs.collect()));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                ensure!(self.stack.len() >= n, "a TUPLE{n} on a shorter stack");
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Tuple(items));
            }
            b'a' | b'e' => {
                let items = if op == b'a' { vec![self.pop()?] } else { self.since_mark()? };
                match self.top()? {
                    Value::List(l) => l.extend(items),
                    _ => bail!("APPEND to something that is not a list"),
                }
            }
            _ => {
                let items = if op == b's' {
                    let v = self.pop()?;
                    vec![self.pop()?, v]
                } else {
                    self.since_mark()?
                };
                ensure!(items.len() % 2 == 0, "SETITEMS with an odd number of items");
                let Value::Dict(d) = self.top()? else { bail!("SETITEM on something that is not a dict") };
                let mut items = items.into_iter();
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    d.push((k, v));
                }
            }
        }
        Ok(())
    }

    /// Globals (the allowed ones), calls of them, BUILD and persistent ids (the storages).
    fn object(&mut self, op: u8) -> Result<()> {
        match op {
            b'c' => {
                let (module, name) = (self.line()?, self.line()?);
                self.global(&module, &name)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => self.global(&m, &n)?,
                    _ => bail!("STACK_GLOBAL of something that is not a name"),
                }
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = call(callable, args)?;
                self.stack.push(v);
            }
            b'b' => {
                // BUILD sets an object's state; the objects allowed here have none to set
                // that a state dict needs (an OrderedDict's is its items, already set).
                self.pop()?;
            }
            _ => {
                let pid = self.pop()?;
                self.stack.push(storage_of(pid)?);
            }
        }
        Ok(())
    }
}

/// The bytes of a STRING: Python 2's repr of a byte string, quoted, with the escapes repr writes
/// (`\\`, `\'`, `\"`, `\n`, `\r`, `\t`, `\xhh`); any other backslash stands for itself.
fn unrepr(line: &str) -> Result<Vec<u8>> {
    let b = line.as_bytes();
    let quoted = b.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[b.len() - 1] == b[0];
    ensure!(quoted, "a STRING that is not quoted: {:?}", clip(line));
    let (body, mut out, mut i) = (&b[1..b.len() - 1], vec![], 0);
    while i < body.len() {
        let (byte, used) = match (body[i], body.get(i + 1)) {
            (b'\\', Some(b'n')) => (b'\n', 2),
            (b'\\', Some(b'r')) => (b'\r', 2),
            (b'\\', Some(b't')) => (b'\t', 2),
            (b'\\', Some(&c @ (b'\\' | b'\'' | b'"'))) => (c, 2),
            (b'\\', Some(b'x')) => {
                let hex = body.get(i + 2..i + 4).and_then(|h| std::str::from_utf8(h).ok());
                let v = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                (v.with_context(|| format!("a STRING with a bad \\x escape: {:?}", clip(line)))?, 4)
            }
            (c, _) => (c, 1),
        };
        out.push(byte);
        i += used;
    }
    Ok(out)
}

/// The text of a UNICODE line: bytes are Latin-1 code points but for `\uXXXX` and `\UXXXXXXXX`
/// (UTF-16 surrogate pairs, as narrow Python 2 builds wrote them, are joined; a lone one becomes
/// U+FFFD).
fn raw_unicode_unescape(b: &[u8]) -> String {
    let (mut units, mut i): (Vec<u16>, usize) = (vec![], 0);
    while i < b.len() {
        let digits = match (b[i], b.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        let hex = b.get(i + 2..i + 2 + digits).and_then(|h| std::str::from_utf8(h).ok());
        match hex.and_then(|h| u32::from_str_radix(h, 16).ok()).filter(|_| digits > 0) {
            Some(code) => {
                let c = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
                match u16::try_from(code) {
                    Ok(unit) => units.push(unit),
                    Err(_) => units.extend(c.encode_utf16(&mut [0; 2]).iter()),
                }
                i += 2 + digits;
            }
            None => {
                units.push(u16::from(b[i]));
                i += 1;
            }
        }
    }
    char::decode_utf16(units).map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER)).collect()
}

/// Calls an allowed global.
fn call(callable: Value, args: Value) -> Result<Value> {
    let Value::Tuple(args) = args else { bail!("a call whose arguments are not a tuple") };
    let ints = |v: &Value| -> Result<Vec<i64>> {
        match v {
            Value::Tuple(items) => items
                .iter()
                .map(|i| match i {
                    Value::Int(n) => Ok(*n),
                    _ => bail!("a tensor size or stride that is not an integer"),
                })
                .collect(),
            _ => bail!("a tensor size or stride that is not a tuple"),
        }
    };
    match callable {
        Value::Global(Allowed::OrderedDict) => Ok(Value::Dict(vec![])),
        Value::Global(Allowed::RebuildParameter) => args.into_iter().next().context("_rebuild_parameter without data"),
        Value::Global(Allowed::RebuildTensor) => {
            let [storage, offset, size, stride, ..] = &args[..] else {
                bail!("_rebuild_tensor_v2 with {} arguments", args.len())
            };
            let Value::Storage { key, kind, numel } = storage else {
                bail!("_rebuild_tensor_v2 of something that is not a storage")
            };
            let Value::Int(offset) = offset else { bail!("a tensor offset that is not an integer") };
            let (size, stride) = (ints(size)?, ints(stride)?);
            ensure!(size.len() == stride.len(), "a tensor of {} sizes and {} strides", size.len(), stride.len());
            ensure!(
                *offset >= 0 && size.iter().all(|&s| s >= 0) && stride.iter().all(|&s| s >= 0),
                "negative tensor geometry"
            );
            // The last element the view reads must lie inside the storage.
            let empty = size.contains(&0);
            let last = size.iter().zip(&stride).try_fold(*offset, |acc, (&n, &s)| {
                if n == 0 { Some(acc) } else { (n - 1).checked_mul(s).and_then(|x| acc.checked_add(x)) }
            });
            ensure!(
                empty || last.is_some_and(|l| l < *numel),
                "a tensor that reads past its storage ({numel} elements)"
            );
            Ok(Value::Tensor(TensorRef {
                storage: key.clone(),
                kind: *kind,
                storage_numel: *numel,
                offset: *offset,
                size,
                stride,
            }))
        }
        Value::Global(Allowed::Storage(_)) => bail!("a storage type called directly"),
        other => bail!("the pickle calls {other:?}, which is not callable"),
    }
}

/// A persistent id: `('storage', storage_type, key, location, numel)`.
fn storage_of(pid: Value) -> Result<Value> {
    let Value::Tuple(items) = pid else { bail!("a persistent id that is not a tuple") };
    match &items[..] {
        [Value::Str(tag), Value::Global(Allowed::Storage(kind)), Value::Str(key), _, Value::Int(numel)]
            if tag == "storage" && *numel >= 0 =>
        {
            ensure!(!key.contains('/') && !key.contains(".."), "a storage key {:?}", clip(key));
            Ok(Value::Storage { key: key.clone(), kind: *kind, numel: *numel })
        }
        _ => bail!("a persistent id that is not a tensor storage"),
    }
}

/// A `.pth` file: its object, and the archive its storages are read from when asked for.
pub struct PthFile {
    pub root: Value,
    zip: zip::ZipArchive<std::fs::File>,
    /// The archive's folder (`<name>/`).
    prefix: String,
    label: String,
}

/// Opens a `torch.save` file and runs its pickle with the restricted machine. Errors name the
/// file.
pub fn read(path: &std::path::Path) -> Result<PthFile> {
    let label = path.display().to_string();
    let file = std::fs::File::open(path).with_context(|| format!("opening {label}"))?;
    open(file, label.clone()).with_context(|| format!("reading {label} as a torch.save file"))
}

fn open(file: std::fs::File, label: String) -> Result<PthFile> {
    let mut zip = zip::ZipArchive::new(file).context("not a zip archive (torch.save writes one since PyTorch 1.6)")?;
    let pkl = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .context("no <archive>/data.pkl in the zip")?
        .to_string();
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut bytes = vec![];
    zip.by_name(&pkl)?.read_to_end(&mut bytes).context("reading data.pkl")?;
    let root = unpickle(&bytes).context("data.pkl")?;
    Ok(PthFile { root, zip, prefix, label })
}

impl PthFile {
    /// The state dict of the file: the dict under `model` (the reference's checkpoints), or the
    /// top-level dict when it maps names to tensors (a bare `torch.save(model.state_dict())`).
    /// Only the storages its tensors use are read.
    pub fn state_dict(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let label = self.label.clone();
        self.named_tensors().with_context(|| format!("reading the state dict of {label}"))
    }

    fn named_tensors(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let Value::Dict(top) = &self.root else { bail!("the file holds no dict") };
        let model = top.iter().find_map(|(k, v)| matches!(k, Value::Str(s) if s == "model").then_some(v));
        let Value::Dict(entries) = model.unwrap_or(&self.root) else { bail!("its `model` is not a dict") };
        let refs: Vec<(String, TensorRef)> = entries
            .iter()
            .filter_map(|(k, v)| match (k, v) {
                (Value::Str(name), Value::Tensor(t)) => Some((name.clone(), t.clone())),
                _ => None,
            })
            .collect();
        ensure!(!refs.is_empty(), "no tensors by name (a state dict, or one under `model`)");
        let mut storages: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (name, t) in refs {
            if !storages.contains_key(&t.storage) {
                let storage = self.storage(&t)?;
                storages.insert(t.storage.clone(), storage);
            }
            let view = storages[&t.storage].f_as_strided(&t.size, &t.stride, Some(t.offset))?;
            out.insert(name, view.contiguous());
        }
        Ok(out)
    }

    /// The storage a tensor views, checked against the length its pickle declares.
    fn storage(&mut self, t: &TensorRef) -> Result<Tensor> {
        let name = format!("{}data/{}", self.prefix, t.storage);
        let mut f = self.zip.by_name(&name).with_context(|| format!("the archive has no {name}"))?;
        let expected = t.storage_numel as u64 * t.kind.elt_size_in_bytes() as u64;
        ensure!(
            f.size() == expected,
            "{name}: {} bytes, its {} elements of {:?} need {expected}",
            f.size(),
            t.storage_numel,
            t.kind
        );
        // Read, not preallocated from the declared size: a short entry fails here.
        let mut data = vec![];
        f.read_to_end(&mut data).with_context(|| format!("reading {name}"))?;
        ensure!(data.len() as u64 == expected, "{name}: {} bytes, {expected} declared", data.len());
        Ok(Tensor::f_from_data_size(&data, &[t.storage_numel], t.kind)?)
    }
}

/// Writes `torch.save({"model": tensors})` as PyTorch would (an `archive/` zip with `data.pkl`,
/// one storage per tensor under `data/`, `version` and `byteorder`), loadable with
/// `torch.load(path, weights_only=True)`.
pub fn write(path: &std::path::Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let label = path.display().to_string();
    let tmp = path.with_extension("pth.partial");
    let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let stored = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut pickle = Pickler::default();
    pickle.state_dict(tensors)?;
    zip.start_file("archive/data.pkl", stored)?;
    zip.write_all(&pickle.out)?;
    zip.start_file("archive/byteorder", stored)?;
    zip.write_all(b"little")?;
    for (i, t) in tensors.values().enumerate() {
        zip.start_file(format!("archive/data/{i}"), stored)?;
        zip.write_all(&crate::weights::tensor_bytes(t))?;
    }
    zip.start_file("archive/version", stored)?;
    zip.write_all(b"3\n")?;
    zip.finish().and_then(|mut w| Ok(w.flush()?)).with_context(|| format!("writing {label}"))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {label}"))
}

/// A protocol-2 pickle of `{"model": OrderedDict(name -> tensor)}`.
#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
    }

    fn int(&mut self, v: i64) {
        self.out.push(0x8a);
        self.out.push(8);
        self.out.extend(v.to_le_bytes());
    }

    fn ints(&mut self, v: &[i64]) {
        self.out.push(b'(');
        v.iter().for_each(|&i| self.int(i));
        self.out.push(b't');
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend(format!("{module}\n{name}\n").as_bytes());
    }

    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.extend([b')', b'R']);
    }

    fn state_dict(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        self.out.extend([0x80, 2, b'}', b'(']);
        self.str("model");
        self.ordered_dict();
        self.out.push(b'(');
        for (i, (name, t)) in tensors.iter().enumerate() {
            self.str(name);
            self.global("torch._utils", "_rebuild_tensor_v2");
            self.out.push(b'(');
            // The storage, as a persistent id.
            self.out.push(b'(');
            self.str("storage");
            self.global("torch", storage_name(t.kind())?);
            self.str(&i.to_string());
            self.str("cpu");
            self.int(t.numel() as i64);
            self.out.extend([b't', b'Q']);
            self.int(0);
            let size = t.size();
            let mut stride = vec![1i64; size.len()];
            for d in (0..size.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * size[d + 1];
            }
            self.ints(&size);
            self.ints(&stride);
            self.out.push(0x89);
            self.ordered_dict();
            self.out.extend([b't', b'R']);
        }
        self.out.extend([b'u', b'u', b'.']);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(v: &Value) -> Vec<(String, String)> {
        let Value::Dict(d) = v else { panic!("not a dict: {v:?}") };
        let text = |v: &Value| match v {
            Value::Str(s) => s.clone(),
            Value::Bytes(b) => format!("b{:?}", String::from_utf8_lossy(b)),
            other => format!("{other:?}"),
        };
        d.iter().map(|(k, v)| (text(k), text(v))).collect()
    }

    fn list(v: Value) -> Vec<Value> {
        let Value::List(l) = v else { panic!("not a list: {v:?}") };
        l
    }

    #[test]
    fn protocol_0_as_python_3_writes_it() {
        // pickle.dumps([{...}], protocol=0) from Python 3.
        let bytes = b"(lp0\n(dp1\nVref_id\np2\nI7\nsVsplit\np3\nVtestA\np4\nsVw\np5\nF1.5\nsVbig\np6\nL1099511627776L\nsVok\np7\nI01\nsVname\np8\nVcaf\xe9 \\u4e2d\\u005cu\\u000a\\U0001f600\np9\nsa.";
        let rows = list(unpickle(bytes).unwrap());
        let want = [
            ("ref_id", "Int(7)"),
            ("split", "testA"),
            ("w", "Float(1.5)"),
            ("big", "Int(1099511627776)"),
            ("ok", "Bool(true)"),
            ("name", "caf\u{e9} \u{4e2d}\\u\n\u{1f600}"),
        ];
        let want: Vec<_> = want.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(dict(&rows[0]), want);
    }

    #[test]
    fn protocol_0_as_python_2_writes_it() {
        // Python 2's byte strings are STRING lines (reprs); keys come back through GET.
        let bytes = b"(lp0\n(dp1\nS'split'\np2\nS'testB'\np3\nsS'ref_id'\np4\nL12345678901L\nsS'esc'\np5\nS'a\\'b\\\\c\\x80\\n'\np6\nsa(dp7\ng2\nS\"val\"\np8\nsV\\ud83d\\ude00\np9\nI-3\nsa.";
        let rows = list(unpickle(bytes).unwrap());
        assert_eq!(rows.len(), 2);
        let Value::Dict(first) = &rows[0] else { panic!() };
        assert!(matches!(&first[1].1, Value::Int(12345678901)));
        let Value::Bytes(esc) = &first[2].1 else { panic!() };
        assert_eq!(esc, b"a'b\\c\x80\n");
        let second = dict(&rows[1]);
        assert_eq!(second[0], ("b\"split\"".to_string(), "b\"val\"".to_string()));
        assert_eq!(second[1], ("\u{1f600}".to_string(), "Int(-3)".to_string()));
    }

    #[test]
    fn malformed_text_opcodes_are_errors() {
        for (bytes, says) in [
            (&b"S'open\n."[..], "not quoted"),
            (b"S'\\x4'\n.", "\\x escape"),
            (b"I12a\n.", "out of range"),
            (b"L99999999999999999999999L\n.", "out of range"),
            (b"Fnot\n.", "FLOAT"),
            (b"(lp0x\n.", "memo key"),
            (b"g7\n.", "never written"),
            (b"(I1\nI2\nI3\nd.", "odd number"),
            (b"I12", "ends inside a text opcode"),
        ] {
            let err = format!("{:#}", unpickle(bytes).unwrap_err());
            assert!(err.contains(says), "{err} does not say {says}");
        }
    }
}
