//! Checkpoints in object storage, without libtorch: the workers write and read them, the
//! coordinator verifies one before it commits it.
//!
//! A checkpoint is a folder `<run>/checkpoints/step-<N>/` (`folder`) holding its files and
//! `manifest.json` (`Manifest`), written last, with every file's size and SHA-256. A folder whose
//! manifest is missing does not exist as a checkpoint: a save that dies half-way leaves only files
//! that `remove_incomplete` cleans up (rank 0 calls it before each save), and `read_file` never
//! returns bytes the manifest does not vouch for (a wrong size or hash is an error naming the
//! file). `write` hashes each file while it uploads it, large files as multipart uploads
//! (`WriteOptions`), and shows the bytes stored as they go (`albef_data::progress`); `check` is the coordinator's cheap test before a commit (the manifest parses
//! and every file it lists exists with its size); `list` finds a run's checkpoints and `remove`
//! deletes one, manifest first. What the files hold (safetensors, the trainer state) is
//! `albef-train`'s business: this crate moves and verifies bytes.

pub mod best;

use albef_data::progress::{self, Progress, Units};
use albef_data::store::{Location, StoreError};
use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{MultipartUpload, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::task::{JoinError, JoinSet};

pub const MANIFEST: &str = "manifest.json";
const VERSION: u64 = 1;
const FOLDER_PREFIX: &str = "step-";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub version: u64,
    /// Optimiser steps taken when the state was captured.
    pub step: u64,
    pub created_unix: u64,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    pub fn entry(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// How files are uploaded.
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions {
    /// Files larger than this go up as multipart uploads of parts this size (S3 needs >= 5 MiB).
    pub part_bytes: usize,
    /// Parts in flight at once.
    pub concurrency: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { part_bytes: 16 << 20, concurrency: 4 }
    }
}

/// `<run>/checkpoints`.
pub fn root(run: &Location) -> Location {
    run.join("checkpoints")
}

/// The folder of the checkpoint taken after `step` steps.
pub fn folder(run: &Location, step: u64) -> Location {
    root(run).join(&format!("{FOLDER_PREFIX}{step}"))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

async fn sha256_off_thread(bytes: Bytes) -> Result<String> {
    tokio::task::spawn_blocking(move || sha256_hex(&bytes)).await.context("hashing")
}

/// Uploads one object, in parts when it is large; `progress` advances as each part is stored.
async fn upload(loc: &Location, bytes: Bytes, opts: WriteOptions, progress: &mut Progress) -> Result<()> {
    let size = bytes.len() as u64;
    if bytes.len() <= opts.part_bytes {
        loc.write_all(bytes).await?;
        progress.advance(size);
        return Ok(());
    }
    let mut upload = loc
        .store
        .put_multipart(&loc.path)
        .await
        .map_err(StoreError)
        .with_context(|| format!("starting {}", loc.url))?;
    let stored = match upload_parts(upload.as_mut(), &bytes, opts, progress).await {
        Ok(()) => upload.complete().await.map(drop),
        Err(e) => Err(e),
    };
    if let Err(e) = stored {
        // Best effort: an upload left open costs storage until the bucket's lifecycle ends it.
        let _ = upload.abort().await;
        return Err(StoreError(e)).with_context(|| format!("uploading {}", loc.url));
    }
    Ok(())
}

/// Sends `bytes` as parts of `opts.part_bytes`, `opts.concurrency` at once, each on the runtime's
/// threads (TLS and hashing of parts in parallel).
async fn upload_parts(
    upload: &mut dyn MultipartUpload,
    bytes: &Bytes,
    opts: WriteOptions,
    progress: &mut Progress,
) -> object_store::Result<()> {
    let mut in_flight = JoinSet::new();
    let mut stored = |joined: Option<Result<object_store::Result<u64>, JoinError>>| -> object_store::Result<()> {
        let size = joined.expect("a part in flight").map_err(|e| object_store::Error::JoinError { source: e })??;
        progress.advance(size);
        Ok(())
    };
    for start in (0..bytes.len()).step_by(opts.part_bytes) {
        if in_flight.len() >= opts.concurrency.max(1) {
            stored(in_flight.join_next().await)?;
        }
        let part = bytes.slice(start..(start + opts.part_bytes).min(bytes.len()));
        let size = part.len() as u64;
        let sent = upload.put_part(part.into());
        in_flight.spawn(async move { sent.await.map(|()| size) });
    }
    while !in_flight.is_empty() {
        stored(in_flight.join_next().await)?;
    }
    Ok(())
}

/// Writes a checkpoint into `dir`: every file (hashed while it uploads), then the manifest.
/// The bytes stored are shown as `storing <dir>` (`albef_data::progress`, part by part);
/// `after_file` sees each file once it is stored (logs, fault injection). On failure the
/// folder's leftovers are removed and the error returned; the manifest is never written.
pub async fn write(
    dir: &Location,
    step: u64,
    files: Vec<(String, Bytes)>,
    opts: WriteOptions,
    after_file: &mut (dyn FnMut(&FileEntry) + Send),
) -> Result<Manifest> {
    let total = files.iter().map(|(_, bytes)| bytes.len() as u64).sum();
    let mut progress = progress::start_in(&format!("storing {}", dir.url), total, Units::Bytes);
    let written = async {
        let mut entries = Vec::with_capacity(files.len());
        for (name, bytes) in files {
            ensure!(name != MANIFEST && !name.is_empty() && !name.contains('/'), "bad checkpoint file name {name:?}");
            let size = bytes.len() as u64;
            let target = dir.join(&name);
            let (sha256, stored) =
                tokio::join!(sha256_off_thread(bytes.clone()), upload(&target, bytes, opts, &mut progress));
            stored?;
            let entry = FileEntry { name, size, sha256: sha256? };
            after_file(&entry);
            entries.push(entry);
        }
        let created_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let manifest = Manifest { version: VERSION, step, created_unix, files: entries };
        dir.join(MANIFEST).write_all(serde_json::to_vec_pretty(&manifest)?).await?;
        Ok(manifest)
    }
    .await;
    if written.is_err()
        && let Err(e) = remove(dir).await
    {
        tracing::warn!(dir = dir.url, "cleaning up a failed checkpoint: {e:#}");
    }
    written
}

/// The manifest of the checkpoint in `dir`; an error when there is none (not a checkpoint).
pub async fn read_manifest(dir: &Location) -> Result<Manifest> {
    let loc = dir.join(MANIFEST);
    let text =
        loc.read_all().await.with_context(|| format!("{} is not a checkpoint (no readable manifest)", dir.url))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).with_context(|| format!("{} is not a valid manifest", loc.url))?;
    ensure!(manifest.version == VERSION, "{}: manifest version {} (expected {VERSION})", loc.url, manifest.version);
    Ok(manifest)
}

/// One file of a checkpoint, checked against the manifest's size and hash.
pub async fn read_file(dir: &Location, manifest: &Manifest, name: &str) -> Result<Bytes> {
    let entry = manifest.entry(name).with_context(|| format!("{}: the manifest lists no {name}", dir.url))?;
    let loc = dir.join(name);
    let bytes = loc.read_all().await?;
    ensure!(
        bytes.len() as u64 == entry.size,
        "{}: {} bytes, the manifest says {} (truncated or altered)",
        loc.url,
        bytes.len(),
        entry.size
    );
    let sha256 = sha256_off_thread(bytes.clone()).await?;
    ensure!(
        sha256 == entry.sha256,
        "{}: SHA-256 {sha256} differs from the manifest's {} (corrupt)",
        loc.url,
        entry.sha256
    );
    Ok(bytes)
}

/// Cheap verification without reading the data: the manifest parses and every file it lists
/// exists with its size (the coordinator checks this before it commits a checkpoint).
pub async fn check(dir: &Location) -> Result<Manifest> {
    let manifest = read_manifest(dir).await?;
    for f in &manifest.files {
        let loc = dir.join(&f.name);
        let meta = loc
            .store
            .head(&loc.path)
            .await
            .map_err(StoreError)
            .with_context(|| format!("{}: listed but not found", loc.url))?;
        ensure!(meta.size == f.size, "{}: {} bytes, the manifest says {}", loc.url, meta.size, f.size);
    }
    Ok(manifest)
}

/// A checkpoint folder found under `<run>/checkpoints`.
#[derive(Clone, Debug)]
pub struct Listed {
    pub step: u64,
    pub location: Location,
    /// Whether its manifest exists (else it is the leftover of a failed save, or one in flight).
    pub complete: bool,
}

/// The checkpoint folders of a run, by step.
pub async fn list(run: &Location) -> Result<Vec<Listed>> {
    let root = root(run);
    let listing = root
        .store
        .list_with_delimiter(Some(&root.path))
        .await
        .map_err(StoreError)
        .with_context(|| format!("listing {}", root.url))?;
    let mut out = vec![];
    for prefix in listing.common_prefixes {
        let Some(name) = prefix.filename() else { continue };
        let Some(step) = name.strip_prefix(FOLDER_PREFIX).and_then(|s| s.parse::<u64>().ok()) else { continue };
        let location = folder(run, step);
        let complete = location.join(MANIFEST).exists().await?;
        out.push(Listed { step, location, complete });
    }
    out.sort_by_key(|l| l.step);
    Ok(out)
}

/// The run's latest complete checkpoint, if any.
pub async fn latest(run: &Location) -> Result<Option<Listed>> {
    Ok(list(run).await?.into_iter().rev().find(|l| l.complete))
}

/// Deletes a checkpoint: the manifest first, so that it stops being one before its files go; on
/// a local file system its folder goes too (object stores have no folders).
pub async fn remove(dir: &Location) -> Result<()> {
    let manifest = dir.join(MANIFEST);
    match manifest.store.delete(&manifest.path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(StoreError(e)).with_context(|| format!("deleting {}", manifest.url)),
    }
    let objects: Vec<_> = dir
        .store
        .list(Some(&dir.path))
        .try_collect()
        .await
        .map_err(StoreError)
        .with_context(|| format!("listing {}", dir.url))?;
    for o in objects {
        match dir.store.delete(&o.location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(StoreError(e)).with_context(|| format!("deleting {}", o.location)),
        }
    }
    if let Some(path) = albef_data::store::local_path(&dir.url) {
        // Best effort: a folder another process wrote into meanwhile stays.
        let _ = std::fs::remove_dir(path);
    }
    Ok(())
}

/// Removes the leftovers of failed saves (folders without a manifest) except `in_flight`'s;
/// returns their steps. Only the job's single writer may call it (rank 0, before it saves).
pub async fn remove_incomplete(run: &Location, in_flight: Option<u64>) -> Result<Vec<u64>> {
    let mut removed = vec![];
    for l in list(run).await? {
        if !l.complete && Some(l.step) != in_flight {
            let has_objects =
                l.location.store.list(Some(&l.location.path)).try_next().await.map_err(StoreError)?.is_some();
            if has_objects {
                remove(&l.location).await?;
                removed.push(l.step);
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
