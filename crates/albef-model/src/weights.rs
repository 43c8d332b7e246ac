//! Weights by name: the full ALBEF state as safetensors (reference state-dict names), and
//! imports of Hugging Face BERT and timm ViT/DeiT checkpoints with a report of what matched.

use crate::vit::interpolate_pos_embed;
use anyhow::{Context, Result, bail, ensure};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tch::{Kind, Tensor, nn};

/// Names PyTorch's state dict has for the tied MLM decoder: saved as copies so that
/// `load_state_dict(strict=True)` in the reference code finds them; accepted and skipped on load.
const TIED: [(&str, &str); 2] = [
    ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    ("cls.predictions.decoder.bias", "cls.predictions.bias"),
];

/// The reference BERT's persistent buffer: an int64 arange of shape `[1, max_position_embeddings]`
/// (the rows of the position embedding). Written beside every text encoder so that the reference
/// code loads our files strictly; on load it may be present (it must be an arange) or absent.
const POSITION_IDS: &str = "bert.embeddings.position_ids";
const POSITION_EMBEDDINGS: &str = "bert.embeddings.position_embeddings.weight";

/// What a load matched, for the user to read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    pub loaded: usize,
    /// Model parameters the file did not provide (they keep their current values).
    pub missing: Vec<String>,
    /// File entries with no parameter of that name (ignored).
    pub unexpected: Vec<String>,
    /// Position embeddings interpolated to the model's resolution.
    pub resized: Vec<String>,
    /// The file had no momentum encoders (a fine-tuned checkpoint): they were copied from the
    /// online ones.
    pub momentum_from_online: bool,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} loaded, {} missing, {} unexpected", self.loaded, self.missing.len(), self.unexpected.len())?;
        if !self.resized.is_empty() {
            write!(f, ", resized: {}", self.resized.join(", "))?;
        }
        if self.momentum_from_online {
            write!(f, "; the file has no momentum encoders: copied from the online ones")?;
        }
        for (label, names) in [("missing", &self.missing), ("unexpected", &self.unexpected)] {
            if !names.is_empty() {
                write!(f, "\n  {label}: {}", abbreviate(names))?;
            }
        }
        Ok(())
    }
}

fn abbreviate(names: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", ... ({} more)", names.len() - SHOWN));
    }
    s
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        other => bail!("no safetensors dtype for {other:?}"),
    })
}

fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        other => bail!("unsupported safetensors dtype {other:?}"),
    })
}

/// Host bytes of a tensor, in its own dtype, C-contiguous.
pub fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.detach().to_device(tch::Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut bytes = vec![0u8; n];
    t.copy_data_u8(&mut bytes, t.numel());
    bytes
}

/// A tensor copied to host memory: what a checkpoint holds while it is written in the background.
pub struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    /// A contiguous CPU tensor (pinned when its source is on a GPU).
    host: Tensor,
}

impl HostTensor {
    fn bytes(&self) -> &[u8] {
        let n = self.host.numel() * self.host.kind().elt_size_in_bytes();
        // SAFETY: `host` is a contiguous CPU tensor of n bytes that this struct owns and nobody
        // writes while it is borrowed: `HostPool::copy` writes it, or queues the device's copy
        // into it, which `serialize` waits for before it borrows this.
        unsafe { std::slice::from_raw_parts(self.host.data_ptr() as *const u8, n) }
    }
}

/// Host buffers kept from one checkpoint to the next. A first copy of several GB into new memory
/// spends most of its time faulting pages in (9 s for the base preset's 3.7 GB on our 2-core
/// machine); into buffers already touched it is one memcpy (about 0.2 s). Buffers come back when
/// the checkpoint that used them has been written (its [`HostTensors`] dropped).
#[derive(Clone, Default)]
pub struct HostPool(std::sync::Arc<std::sync::Mutex<BTreeMap<String, Tensor>>>);

impl HostPool {
    /// Makes, on a thread of its own, the buffers a copy of tensors like `named` takes, their
    /// memory mapped (pinned where a tensor is on a GPU), so that even the first checkpoint copies
    /// into ready memory instead of faulting in several GB while the step waits. A copy asked for
    /// meanwhile waits for them. The handle tells when they are ready (dropping it is fine).
    pub fn reserve(&self, named: &BTreeMap<String, Tensor>) -> std::thread::JoinHandle<()> {
        let wanted: Vec<(String, Vec<i64>, Kind, tch::Device)> =
            named.iter().map(|(n, t)| (n.clone(), t.size(), t.kind(), t.device())).collect();
        let pool = self.clone();
        let (locked, wait_for_lock) = std::sync::mpsc::channel();
        let reserving = std::thread::spawn(move || {
            let mut spare = pool.0.lock().unwrap_or_else(|e| e.into_inner());
            let _ = locked.send(());
            for (name, shape, kind, device) in wanted {
                if spare.get(&name).is_some_and(|h| h.size() == shape && h.kind() == kind) {
                    continue;
                }
                spare.insert(name, host_buffer(&shape, kind, device, true));
            }
        });
        // Holding the lock before returning: no copy can take new buffers of its own first.
        let _ = wait_for_lock.recv();
        reserving
    }

    /// Copies named tensors to host memory, into this pool's buffers where it has ones of the
    /// right shape and dtype. From a GPU the copies are queued on its stream and this returns at
    /// once (the step does not wait): [`serialize`] waits for them.
    pub fn copy(&self, named: &BTreeMap<String, Tensor>) -> Result<HostTensors> {
        let mut spare = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut filling = None;
        let tensors = tch::no_grad(|| {
            named
                .iter()
                .map(|(name, t)| {
                    let host = match spare.remove(name) {
                        Some(h) if h.size() == t.size() && h.kind() == t.kind() => h,
                        _ => host_buffer(&t.size(), t.kind(), t.device(), false),
                    };
                    if t.device().is_cuda() {
                        // Queued behind the step's kernels, ahead of the next step's updates.
                        albef_torch_ext::copy_non_blocking(&host, t)?;
                        filling = Some(t.device());
                    } else {
                        host.shallow_clone().copy_(t);
                    }
                    let shape = t.size().iter().map(|&d| d as usize).collect();
                    Ok((name.clone(), HostTensor { dtype: dtype_of(t.kind())?, shape, host }))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        drop(spare);
        Ok(HostTensors { tensors, filling, pool: self.clone() })
    }
}

/// A CPU buffer for a tensor of `device`: pinned for a GPU's (copies from it do not wait), and its
/// pages touched when asked (the first write into untouched memory faults every page in).
fn host_buffer(shape: &[i64], kind: Kind, device: tch::Device, touched: bool) -> Tensor {
    if device.is_cuda() {
        // Pinning maps every page.
        Tensor::empty(shape, (kind, tch::Device::Cpu)).pin_memory(device)
    } else if touched {
        Tensor::zeros(shape, (kind, tch::Device::Cpu))
    } else {
        Tensor::empty(shape, (kind, tch::Device::Cpu))
    }
}

/// Named host copies whose buffers go back to their pool when dropped.
pub struct HostTensors {
    tensors: Vec<(String, HostTensor)>,
    /// The GPU whose stream still fills the buffers, if any.
    filling: Option<tch::Device>,
    pool: HostPool,
}

impl Drop for HostTensors {
    fn drop(&mut self) {
        let mut spare = self.pool.0.lock().unwrap_or_else(|e| e.into_inner());
        for (name, t) in self.tensors.drain(..) {
            spare.insert(name, t.host);
        }
    }
}

/// Copies named tensors to host memory in new buffers (one-off saves).
pub fn to_host(named: &BTreeMap<String, Tensor>) -> Result<HostTensors> {
    HostPool::default().copy(named)
}

/// Host tensors as the bytes of one safetensors file (names sorted).
pub fn serialize(host: &HostTensors) -> Result<Vec<u8>> {
    if let Some(device) = host.filling {
        crate::device::synchronize(device);
    }
    let views = host
        .tensors
        .iter()
        .map(|(n, h)| Ok((n.clone(), TensorView::new(h.dtype, h.shape.clone(), h.bytes())?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// Writes named tensors as one safetensors file, atomically: a temporary file renamed into
/// place, so a crash never leaves a half-written file under `path`.
pub fn write_safetensors(named: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let bytes = serialize(&to_host(named)?)?;
    let tmp = path.with_extension("safetensors.partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Every tensor of safetensors bytes, on the CPU; `label` names the source in errors.
pub fn deserialize(bytes: &[u8], label: &str) -> Result<BTreeMap<String, Tensor>> {
    let st = SafeTensors::deserialize(bytes).with_context(|| format!("{label} is not a valid safetensors file"))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind_of(view.dtype())?)
            .with_context(|| format!("{label}: tensor {name}"))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Reads every tensor of a safetensors file onto the CPU.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    deserialize(&bytes, &path.display().to_string())
}

/// Every variable of the store plus what the reference state dict derives from them (the
/// tied-decoder aliases and BERT's `position_ids` buffer), under the reference names.
pub fn state_dict(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    let mut out: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    for prefix in ["text_encoder.", "text_encoder_m."] {
        for (alias, source) in TIED {
            if let Some(t) = out.get(&format!("{prefix}{source}")) {
                let t = t.shallow_clone();
                out.insert(format!("{prefix}{alias}"), t);
            }
        }
        if let Some(pe) = out.get(&format!("{prefix}{POSITION_EMBEDDINGS}")) {
            let ids = Tensor::arange(pe.size()[0], (Kind::Int64, pe.device())).unsqueeze(0);
            out.insert(format!("{prefix}{POSITION_IDS}"), ids);
        }
    }
    out
}

/// Saves the full model state (online, momentum, queues, queue_ptr, temp).
pub fn save(vs: &nn::VarStore, path: &Path) -> Result<()> {
    write_safetensors(&state_dict(vs), path)
}

fn is_tied_alias(name: &str) -> bool {
    TIED.iter().any(|(alias, _)| name.ends_with(alias))
}

/// A `position_ids` buffer in a file must be what the reference registers: `arange` as `[1, n]`.
fn check_position_ids(name: &str, value: &Tensor) -> Result<()> {
    let size = value.size();
    let n = match size[..] {
        [1, n] => n,
        _ => bail!("{name}: shape {size:?}, expected [1, max_position_embeddings]"),
    };
    let expected = Tensor::arange(n, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0);
    ensure!(value.to_kind(Kind::Int64).to_device(tch::Device::Cpu).equal(&expected), "{name} is not 0..{n}");
    Ok(())
}

/// Tensors checked against the store and ready to copy in.
struct Prepared {
    copies: Vec<(Tensor, Tensor)>,
    report: LoadReport,
}

/// Matches `tensors` (already renamed to the store's names) with the store's variables and
/// checks shapes (position embeddings are interpolated to the model's resolution) without
/// changing anything, so that a bad file leaves the model as it was.
fn prepare(vs: &nn::VarStore, tensors: BTreeMap<String, Tensor>) -> Result<Prepared> {
    let vars = vs.variables();
    let mut report = LoadReport::default();
    let mut copies = vec![];
    let mut seen = BTreeSet::new();
    for (name, value) in tensors {
        let Some(var) = vars.get(&name) else {
            if name.ends_with(POSITION_IDS) {
                check_position_ids(&name, &value)?;
            } else if !is_tied_alias(&name) {
                report.unexpected.push(name);
            }
            continue;
        };
        let mut value = value;
        if var.size() != value.size() {
            ensure!(
                name.ends_with("pos_embed"),
                "{name}: shape {:?} in the file, {:?} in the model",
                value.size(),
                var.size()
            );
            value = tch::no_grad(|| interpolate_pos_embed(&value.to_kind(Kind::Float), var.size()[1]))
                .with_context(|| format!("interpolating {name}"))?;
            report.resized.push(name.clone());
        }
        copies.push((var.shallow_clone(), value));
        seen.insert(name);
    }
    report.loaded = copies.len();
    report.missing = vars.keys().filter(|n| !seen.contains(*n)).cloned().collect();
    report.missing.sort();
    Ok(Prepared { copies, report })
}

impl Prepared {
    fn commit(self) -> LoadReport {
        tch::no_grad(|| {
            for (var, value) in &self.copies {
                var.shallow_clone().copy_(&value.to_kind(var.kind()).to_device(var.device()));
            }
        });
        self.report
    }
}

/// Copies `tensors` (already renamed to the store's names) into the store; parameters the file
/// lacks keep their values and are reported as missing.
pub fn load_named(vs: &nn::VarStore, tensors: BTreeMap<String, Tensor>) -> Result<LoadReport> {
    Ok(prepare(vs, tensors)?.commit())
}

/// Loads a full ALBEF state saved by [`save`] (or converted from the reference checkpoint).
/// Every parameter must be present; on any error the model is left unchanged.
pub fn load(vs: &nn::VarStore, path: &Path) -> Result<LoadReport> {
    load_complete(vs, read_safetensors(path)?, &path.display().to_string())
}

/// Checks that `tensors` hold every parameter of the store with the right shapes, and only
/// then copies them in (so that a bad state leaves the model unchanged).
pub fn prepare_complete(vs: &nn::VarStore, tensors: BTreeMap<String, Tensor>, label: &str) -> Result<PreparedLoad> {
    let prepared = prepare(vs, tensors).with_context(|| format!("loading {label}"))?;
    let missing = &prepared.report.missing;
    ensure!(missing.is_empty(), "{label} lacks {} model parameters: {}", missing.len(), abbreviate(missing));
    Ok(PreparedLoad(prepared))
}

/// [`prepare_complete`] then commit.
pub fn load_complete(vs: &nn::VarStore, tensors: BTreeMap<String, Tensor>, label: &str) -> Result<LoadReport> {
    Ok(prepare_complete(vs, tensors, label)?.commit())
}

/// A checked load, to commit once every other part of a restore has been checked too.
pub struct PreparedLoad(Prepared);

impl PreparedLoad {
    pub fn commit(self) -> LoadReport {
        self.0.commit()
    }
}

/// Renames a Hugging Face BERT key to ALBEF's `text_encoder.*` names: accepts BertForMaskedLM /
/// BertForPreTraining (`bert.*`, `cls.*`) and bare BertModel (`embeddings.*`, `encoder.*`) keys,
/// and the old `LayerNorm.gamma/beta` spelling.
fn hf_bert_name(key: &str) -> String {
    let key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias");
    if key.starts_with("embeddings.") || key.starts_with("encoder.") || key.starts_with("pooler.") {
        format!("text_encoder.bert.{key}")
    } else {
        format!("text_encoder.{key}")
    }
}

/// Renames a reference ALBEF key to this model's names: the reference's fine-tuning models hold
/// the text encoder as a bare BertModel (`text_encoder.embeddings.*`: their loaders strip
/// `bert.`), its pretraining model and this one as BertForMaskedLM (`text_encoder.bert.*`).
fn reference_name(key: &str) -> String {
    for root in ["text_encoder.", "text_encoder_m."] {
        if let Some(rest) = key.strip_prefix(root)
            && ["embeddings.", "encoder.", "pooler."].iter().any(|p| rest.starts_with(p))
        {
            return format!("{root}bert.{rest}");
        }
    }
    key.to_string()
}

/// The state dict of a reference ALBEF checkpoint: a `torch.save` file (`.pth`, the state under
/// `model` as the authors released it, or a bare state dict) or a safetensors file (`albef model
/// export`), under this model's names.
pub fn read_reference(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let tensors = match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => read_safetensors(path)?,
        _ => crate::pth::read(path)?.state_dict()?,
    };
    Ok(tensors.into_iter().map(|(k, v)| (reference_name(&k), v)).collect())
}

/// Imports a Hugging Face BERT checkpoint (safetensors) into the text and fusion layers. The
/// report's `missing` lists the new parameters (cross-attention; the rest of the model).
pub fn import_hf_bert(vs: &nn::VarStore, path: &Path) -> Result<LoadReport> {
    let renamed = read_safetensors(path)?.into_iter().map(|(k, v)| (hf_bert_name(&k), v)).collect();
    let mut report = load_named(vs, renamed).with_context(|| format!("importing BERT from {}", path.display()))?;
    report.missing.retain(|n| n.starts_with("text_encoder."));
    Ok(report)
}

/// Imports a timm ViT / DeiT checkpoint (safetensors) into the image encoder, interpolating the
/// position embedding to the configured resolution. `head.*` shows up as unexpected.
pub fn import_timm_vit(vs: &nn::VarStore, path: &Path) -> Result<LoadReport> {
    let renamed = read_safetensors(path)?.into_iter().map(|(k, v)| (format!("visual_encoder.{k}"), v)).collect();
    let mut report = load_named(vs, renamed).with_context(|| format!("importing ViT from {}", path.display()))?;
    report.missing.retain(|n| n.starts_with("visual_encoder."));
    Ok(report)
}
