//! Locations of data and checkpoints in object storage: local paths and file:// by default,
//! s3://, gs:// and az:// with credentials and endpoints from the environment (object_store's
//! URL parsing alone does not read it), and brace expansion of shard names.

use anyhow::{Context, Result, bail, ensure};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio_util::io::{StreamReader, SyncIoBridge};

/// An object store's error without its first cause: object_store's messages end with that
/// cause's (`Object at location x not found: No such file...`), so a printed chain (`{:#}`)
/// would repeat it. Deeper causes stay.
#[derive(Debug)]
pub struct StoreError(pub object_store::Error);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0).and_then(|cause| cause.source())
    }
}

/// A local path that is no regular file (a FIFO, device or socket): refused before it is
/// opened, since opening a FIFO blocks until a writer comes and a device may never end.
#[derive(Debug)]
pub struct NotAFile {
    pub url: String,
    pub kind: &'static str,
}

impl std::fmt::Display for NotAFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is a {}, not a regular file", self.url, self.kind)
    }
}

impl std::error::Error for NotAFile {}

/// An object larger than a reader accepts, known from its metadata before any byte is read.
#[derive(Debug)]
pub struct Oversized {
    pub url: String,
    pub size: u64,
    pub max_bytes: u64,
}

impl std::fmt::Display for Oversized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} holds {} bytes, more than the {} accepted", self.url, self.size, self.max_bytes)
    }
}

impl std::error::Error for Oversized {}

/// An object (or prefix) in a store, with the URL it was opened from for messages.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub path: StorePath,
    pub url: String,
}

impl Location {
    /// Opens `url`: `s3://bucket/key`, `gs://bucket/key`, `az://container/key` (also
    /// `abfs(s)://`, `azure://`), `file:///abs/path`, or a plain (relative or absolute) path.
    pub fn open(url: &str) -> Result<Self> {
        let (scheme, _) = url.split_once("://").unwrap_or(("", url));
        if !matches!(scheme, "" | "file") {
            // The cloud stores' HTTP client takes TLS from the process's rustls provider: ring,
            // the one tonic uses too. Err: one is installed already, which is all this needs.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let (store, path): (Arc<dyn ObjectStore>, StorePath) = match scheme {
            "" | "file" => {
                let raw = url.strip_prefix("file://").unwrap_or(url);
                let abs = std::path::absolute(raw).with_context(|| format!("resolving {raw}"))?;
                let path = StorePath::from_absolute_path(&abs).with_context(|| format!("invalid path {url}"))?;
                (Arc::new(object_store::local::LocalFileSystem::new()), path)
            }
            "s3" | "s3a" => {
                let store = object_store::aws::AmazonS3Builder::from_env().with_url(url).build().map_err(StoreError);
                (Arc::new(store.with_context(|| format!("configuring S3 for {url}"))?), key_of(url)?)
            }
            "gs" => {
                let store =
                    object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url).build().map_err(StoreError);
                (Arc::new(store.with_context(|| format!("configuring GCS for {url}"))?), key_of(url)?)
            }
            "az" | "azure" | "abfs" | "abfss" | "adl" => {
                let store =
                    object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url).build().map_err(StoreError);
                (Arc::new(store.with_context(|| format!("configuring Azure for {url}"))?), key_of(url)?)
            }
            other => bail!("{url}: unsupported scheme {other}:// (use a path, file://, s3://, gs:// or az://)"),
        };
        Ok(Location { store, path, url: url.to_string() })
    }

    /// The location of `name` under this one (a prefix).
    pub fn join(&self, name: &str) -> Location {
        let mut path = self.path.clone();
        for part in name.split('/').filter(|p| !p.is_empty()) {
            path = path.clone().join(part);
        }
        Location { store: self.store.clone(), path, url: format!("{}/{}", self.url.trim_end_matches('/'), name) }
    }

    /// The location of a sibling object (same prefix, another name).
    pub fn sibling(&self, name: &str) -> Location {
        let parent = match self.url.rsplit_once('/') {
            Some((dir, _)) => dir.to_string(),
            None => ".".to_string(),
        };
        let mut parts: Vec<_> = self.path.parts().collect();
        parts.pop();
        let mut path: StorePath = parts.into_iter().collect();
        path = path.clone().join(name);
        Location { store: self.store.clone(), path, url: format!("{parent}/{name}") }
    }

    pub async fn read_all(&self) -> Result<bytes::Bytes> {
        self.read_at_most(u64::MAX).await
    }

    /// The whole object, unless its metadata says it holds more than `max_bytes`: then an
    /// [`Oversized`] error, before any of its bytes is read.
    pub async fn read_at_most(&self, max_bytes: u64) -> Result<bytes::Bytes> {
        self.check_regular_file()?;
        let get =
            self.store.get(&self.path).await.map_err(StoreError).with_context(|| format!("reading {}", self.url))?;
        let size = get.meta.size;
        if size > max_bytes {
            return Err(Oversized { url: self.url.clone(), size, max_bytes }.into());
        }
        get.bytes().await.map_err(StoreError).with_context(|| format!("reading {}", self.url))
    }

    pub async fn write_all(&self, data: impl Into<PutPayload>) -> Result<()> {
        self.store
            .put(&self.path, data.into())
            .await
            .map_err(StoreError)
            .with_context(|| format!("writing {}", self.url))?;
        Ok(())
    }

    pub async fn exists(&self) -> Result<bool> {
        match self.store.head(&self.path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StoreError(e)).with_context(|| format!("checking {}", self.url)),
        }
    }

    /// A blocking reader streaming the object from byte `offset` on, for use on a thread that
    /// is not a runtime worker (decode threads); nothing is buffered beyond the stream's chunks.
    pub fn stream_from(&self, handle: &Handle, offset: u64) -> Result<Box<dyn Read + Send>> {
        self.check_regular_file()?;
        let opts = GetOptions { range: (offset > 0).then_some(GetRange::Offset(offset)), ..Default::default() };
        let get = handle
            .block_on(self.store.get_opts(&self.path, opts))
            .map_err(StoreError)
            .with_context(|| format!("opening {}", self.url))?;
        let stream = get.into_stream().map_err(|e| std::io::Error::other(StoreError(e)));
        Ok(Box::new(SyncIoBridge::new_with_handle(StreamReader::new(stream), handle.clone())))
    }

    /// [`Location::stream_from`] with a deadline: a read that receives no byte for `stall` is
    /// retried from where it stopped, [`STALL_RETRIES`] times, then fails (a stalled object
    /// store or NFS server never hangs the reader). For a thread that is not a runtime worker.
    pub fn stream_within(&self, handle: &Handle, offset: u64, stall: Duration) -> Result<DeadlineReader> {
        self.check_regular_file()?;
        let loc = self.clone();
        let open: Opener = Box::new(move |at| {
            let loc = loc.clone();
            Box::pin(async move {
                let opts = GetOptions { range: (at > 0).then_some(GetRange::Offset(at)), ..Default::default() };
                let get = loc.store.get_opts(&loc.path, opts).await.map_err(StoreError);
                let get = get.with_context(|| format!("opening {}", loc.url))?;
                Ok(get.into_stream().map_err(|e| std::io::Error::other(StoreError(e))).boxed())
            })
        });
        let mut reader = DeadlineReader::new(open, handle.clone(), offset, stall, self.url.clone());
        // Opened now, so that a missing object is an error here, not at the first read.
        reader.open_now()?;
        Ok(reader)
    }

    /// [`Location::read_at_most`] for a thread that is not a runtime worker, every read with a
    /// deadline: an object through a [`DeadlineReader`], a local file in one go on a blocking
    /// thread, whole within `stall` (through the store, a stat, an open and each chunk a task of
    /// their own cost several times the read of a small file: an image, a caption).
    pub fn read_at_most_within(&self, handle: &Handle, max_bytes: u64, stall: Duration) -> Result<Vec<u8>> {
        self.check_regular_file()?;
        if local_path(&self.url).is_some() {
            let (path, url) = (self.filesystem_path()?, self.url.clone());
            let read = handle.spawn_blocking(move || {
                let file = std::fs::File::open(&path).with_context(|| format!("reading {url}"))?;
                let size = file.metadata().with_context(|| format!("reading {url}"))?.len();
                read_capped(size, max_bytes, &url, || Ok(file))
            });
            let read = within(handle, stall, read);
            let read =
                read.with_context(|| format!("reading {}: not read within {} s", self.url, stall.as_secs_f64()))?;
            return read.context("the read's thread failed")?;
        }
        let head = within(handle, stall, self.store.head(&self.path));
        let meta = head.with_context(|| format!("reading {}: no answer within {} s", self.url, stall.as_secs_f64()))?;
        let meta = meta.map_err(StoreError);
        let size = meta.with_context(|| format!("reading {}", self.url))?.size;
        read_capped(size, max_bytes, &self.url, || self.stream_within(handle, 0, stall))
    }

    /// Refuses a local path that is no regular file from its metadata (stat follows links but
    /// opens nothing); a missing path or a folder is left to the store's own error.
    fn check_regular_file(&self) -> Result<()> {
        use std::os::unix::fs::FileTypeExt;
        if local_path(&self.url).is_none() {
            return Ok(());
        }
        let Ok(kind) = std::fs::metadata(self.filesystem_path()?).map(|m| m.file_type()) else { return Ok(()) };
        let named = [
            (kind.is_fifo(), "named pipe (FIFO)"),
            (kind.is_socket(), "socket"),
            (kind.is_char_device() || kind.is_block_device(), "device"),
        ];
        match named.into_iter().find(|(is, _)| *is) {
            Some((_, kind)) => Err(NotAFile { url: self.url.clone(), kind }.into()),
            None => Ok(()),
        }
    }

    /// The file the local store would open for this location's path.
    fn filesystem_path(&self) -> Result<std::path::PathBuf> {
        Ok(object_store::local::LocalFileSystem::new().path_to_filesystem(&self.path).map_err(StoreError)?)
    }
}

/// At most `max_bytes` of the object `url` of `size` bytes (as its metadata says), from the
/// reader `open` gives: a larger one is refused unread, and one that grew since is read to
/// `max_bytes` + 1 and refused.
fn read_capped<R: Read>(size: u64, max_bytes: u64, url: &str, open: impl FnOnce() -> Result<R>) -> Result<Vec<u8>> {
    let oversized = |size| Oversized { url: url.to_string(), size, max_bytes };
    if size > max_bytes {
        return Err(oversized(size).into());
    }
    let mut bytes = Vec::with_capacity(size.min(1 << 20) as usize);
    open()?.take(max_bytes.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(oversized(bytes.len() as u64).into());
    }
    Ok(bytes)
}

/// How many times a stalled read is retried before it fails.
pub const STALL_RETRIES: u32 = 3;

/// Opens an object's bytes from an offset.
type Opener = Box<dyn Fn(u64) -> BoxFuture<'static, Result<ByteStream>> + Send>;
type ByteStream = BoxStream<'static, std::io::Result<bytes::Bytes>>;

/// A blocking reader of an object whose every wait (opening, each chunk) has a deadline; a
/// stalled read is opened again from the next byte not yet read.
pub struct DeadlineReader {
    open: Opener,
    handle: Handle,
    stall: Duration,
    url: String,
    /// The object offset of the next byte to hand out.
    at: u64,
    stream: Option<ByteStream>,
    chunk: bytes::Bytes,
    /// Stalls met so far.
    stalls: u32,
}

impl DeadlineReader {
    fn new(open: Opener, handle: Handle, at: u64, stall: Duration, url: String) -> Self {
        DeadlineReader { open, handle, stall, url, at, stream: None, chunk: bytes::Bytes::new(), stalls: 0 }
    }

    /// Opens the stream from the next byte not yet handed out, unless it is open.
    fn open_now(&mut self) -> std::io::Result<()> {
        while self.stream.is_none() {
            match within(&self.handle, self.stall, (self.open)(self.at)) {
                Some(opened) => self.stream = Some(opened.map_err(|e| std::io::Error::other(format!("{e:#}")))?),
                None => self.stalled()?,
            }
        }
        Ok(())
    }

    /// The next chunk; None at the end. A stall drops the stream (and its stuck request).
    fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        loop {
            self.open_now()?;
            let stream = self.stream.as_mut().expect("opened");
            if let Some(chunk) = within(&self.handle, self.stall, stream.next()) {
                return chunk.transpose();
            }
            self.stream = None;
            self.stalled()?;
        }
    }

    /// Counts a stall; an error once there were more than [`STALL_RETRIES`].
    fn stalled(&mut self) -> std::io::Result<()> {
        self.stalls += 1;
        if self.stalls <= STALL_RETRIES {
            return Ok(());
        }
        let (url, secs) = (&self.url, self.stall.as_secs_f64());
        let what = format!("reading {url}: no byte for {secs} s, {} times (data.read_timeout_s)", self.stalls);
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
    }
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.next_chunk()? {
                Some(chunk) => self.chunk = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        self.at += n as u64;
        Ok(n)
    }
}

/// `fut`'s output, unless it takes longer than `stall`.
fn within<T>(handle: &Handle, stall: Duration, fut: impl Future<Output = T>) -> Option<T> {
    // The timer is made inside the runtime, whose clock drives it.
    handle.block_on(async { tokio::time::timeout(stall, fut).await.ok() })
}

/// The directory of an object URL or path (`data/test.json` -> `data`).
pub fn parent_of(url: &str) -> String {
    match url.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) => "/".into(),
        Some((dir, _)) => dir.into(),
        None => ".".into(),
    }
}

/// The local folder or file a location URL names (a plain path or `file://`); None for object
/// stores.
pub fn local_path(url: &str) -> Option<std::path::PathBuf> {
    match url.split_once("://") {
        None => Some(url.into()),
        Some(("file", path)) => Some(path.into()),
        Some(_) => None,
    }
}

fn key_of(url: &str) -> Result<StorePath> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let key = rest.split_once('/').map(|(_, k)| k).unwrap_or("");
    StorePath::parse(key).with_context(|| format!("invalid object key in {url}"))
}

/// What a training source is, for errors about one.
pub const ACCEPTED_SOURCES: &str = "a source is an ALBEF annotation file (.json: image, caption) or a WebDataset \
     tar shard (.tar, as img2dataset writes them); name several with brace patterns (train-{000..127}.tar) or \
     globs (shards/*.tar, s3://bucket/shards/*.tar)";

/// Every object `patterns` name, pattern by pattern (see [`expand_pattern`]).
pub async fn expand_patterns(patterns: &[String]) -> Result<Vec<String>> {
    let mut urls = vec![];
    for pattern in patterns {
        urls.extend(expand_pattern(pattern).await?);
    }
    Ok(urls)
}

/// The objects a source pattern names: brace groups expanded (see [`expand_braces`]), then `*`
/// and `?` matched against what the store lists (local folders and object stores alike), one
/// path component at a time, sorted. A pattern without wildcards is taken as written.
pub async fn expand_pattern(pattern: &str) -> Result<Vec<String>> {
    let mut out = vec![];
    for url in expand_braces(pattern)? {
        let Some((folder, rest)) = split_glob(&url)? else {
            out.push(url);
            continue;
        };
        let root = Location::open(folder.unwrap_or("."))?;
        let below = glob(&root, rest).await.with_context(|| format!("expanding {url}"))?;
        let mut matched: Vec<String> = match folder {
            None => below,
            Some(f) => below.iter().map(|name| format!("{}/{name}", f.trim_end_matches('/'))).collect(),
        };
        ensure!(!matched.is_empty(), "{url} matches no file ({ACCEPTED_SOURCES})");
        matched.sort();
        out.extend(matched);
    }
    Ok(out)
}

/// The folder of a source's object, or a glob's folder up to its first wildcard.
pub fn folder_of_source(url: &str) -> Result<String> {
    Ok(match split_glob(url)? {
        None => parent_of(url),
        Some((folder, _)) => folder.unwrap_or(".").to_string(),
    })
}

/// A glob's literal folder (`None`: the current one, named by nothing in the results) and the
/// components after it; `None` when `url` has no wildcard.
fn split_glob(url: &str) -> Result<Option<(Option<&str>, &str)>> {
    let Some(wild) = url.find(['*', '?']) else { return Ok(None) };
    // An object store's bucket (container) is no folder to list: wildcards go after it.
    if let Some((scheme, rest)) = url.split_once("://")
        && scheme != "file"
    {
        let bucket_end = scheme.len() + 3 + rest.find('/').unwrap_or(rest.len());
        ensure!(wild > bucket_end, "{url}: wildcards match object names, not buckets or containers");
    }
    Ok(Some(match url[..wild].rfind('/') {
        None => (None, url),
        Some(0) => (Some("/"), &url[1..]),
        Some(slash) => (Some(&url[..slash]), &url[slash + 1..]),
    }))
}

/// The paths below `root` of the objects that match `rest`: each component with a wildcard
/// lists the folders (the objects, for the last) of its level, each other one is taken as written.
async fn glob(root: &Location, rest: &str) -> Result<Vec<String>> {
    let mut level = vec![(root.clone(), String::new())];
    let components: Vec<&str> = rest.split('/').collect();
    for (i, component) in components.iter().enumerate() {
        let last = i + 1 == components.len();
        let mut next = vec![];
        for (loc, below) in level {
            let named = |name: &str| (loc.join(name), format!("{below}{name}{}", if last { "" } else { "/" }));
            if !component.contains(['*', '?']) {
                let (child, name) = named(component);
                if !last || child.exists().await? {
                    next.push((child, name));
                }
                continue;
            }
            let listing = loc
                .store
                .list_with_delimiter(Some(&loc.path))
                .await
                .map_err(StoreError)
                .with_context(|| format!("listing {}", loc.url))?;
            let children = match last {
                true => listing.objects.into_iter().map(|o| o.location).collect(),
                false => listing.common_prefixes,
            };
            let names = children.iter().filter_map(|p| p.filename());
            next.extend(names.filter(|n| wildcard_match(component.as_bytes(), n.as_bytes())).map(named));
        }
        level = next;
    }
    Ok(level.into_iter().map(|(_, name)| name).collect())
}

/// `*` (any run of characters) and `?` (one character) against a whole name.
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (None, None) => true,
        (Some((b'*', rest)), _) => {
            wildcard_match(rest, name) || (!name.is_empty() && wildcard_match(pattern, &name[1..]))
        }
        (Some((b'?', rest)), Some((_, name_rest))) => wildcard_match(rest, name_rest),
        (Some((p, rest)), Some((n, name_rest))) => p == n && wildcard_match(rest, name_rest),
        _ => false,
    }
}

/// Expands `{000000..000127}` (zero padding kept) and `{a,b,c}` groups, left to right:
/// `data/train-{000..002}.tar` -> `data/train-000.tar`, `data/train-001.tar`, `data/train-002.tar`.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        ensure!(!pattern.contains('}'), "unbalanced '}}' in {pattern:?}");
        return Ok(vec![pattern.to_string()]);
    };
    let close =
        pattern[open..].find('}').map(|i| open + i).with_context(|| format!("unbalanced '{{' in {pattern:?}"))?;
    let (head, body, tail) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let choices: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let (lo, hi): (u64, u64) = (
            a.parse().with_context(|| format!("bad range start {a:?} in {pattern:?}"))?,
            b.parse().with_context(|| format!("bad range end {b:?} in {pattern:?}"))?,
        );
        ensure!(lo <= hi, "empty range {{{body}}} in {pattern:?}");
        ensure!(hi - lo < 10_000_000, "range {{{body}}} in {pattern:?} is implausibly large");
        let width = if a.starts_with('0') && a.len() > 1 { a.len() } else { 0 };
        (lo..=hi).map(|i| format!("{i:0width$}")).collect()
    } else {
        body.split(',').map(str::to_string).collect()
    };
    let rests = expand_braces(tail)?;
    Ok(choices.iter().flat_map(|c| rests.iter().map(move |rest| format!("{head}{c}{rest}"))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_ranges_and_lists() {
        assert_eq!(expand_braces("a-{08..11}.tar").unwrap(), vec!["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]);
        assert_eq!(expand_braces("{x,y}/{1..2}").unwrap(), vec!["x/1", "x/2", "y/1", "y/2"]);
        assert_eq!(expand_braces("{9..10}").unwrap(), vec!["9", "10"]);
        assert_eq!(expand_braces("plain.tar").unwrap(), vec!["plain.tar"]);
        assert!(expand_braces("bad-{1..").is_err());
        assert!(expand_braces("bad-{5..1}").is_err());
    }

    #[test]
    fn plain_paths_resolve_and_siblings_share_the_folder() {
        let loc = Location::open("data/train-000.tar").unwrap();
        assert!(loc.path.as_ref().ends_with("data/train-000.tar"));
        let sib = loc.sibling("train-000_stats.json");
        assert!(sib.path.as_ref().ends_with("data/train-000_stats.json"), "{}", sib.path);
        assert_eq!(sib.url, "data/train-000_stats.json");
        assert!(Location::open("ftp://x/y").is_err());
    }

    fn expanded(pattern: &str) -> Result<Vec<String>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(expand_pattern(pattern))
    }

    #[test]
    fn globs_match_local_files_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("x/sub.tar")).unwrap();
        for f in ["b.tar", "a.tar", "c.json", "ab.tar.gz", "x/d.tar"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let d = dir.path().to_str().unwrap();
        for root in [d.to_string(), format!("file://{d}")] {
            let names = |p: &str| -> Vec<String> {
                let urls = expanded(&format!("{root}/{p}")).unwrap();
                urls.iter().map(|u| u.strip_prefix(&format!("{root}/")).unwrap().to_string()).collect()
            };
            assert_eq!(names("*.tar"), ["a.tar", "b.tar"], "files only, sorted");
            assert_eq!(names("?.json"), ["c.json"]);
            assert_eq!(names("{a,b}.tar"), ["a.tar", "b.tar"]);
            assert_eq!(names("*/*.tar"), ["x/d.tar"], "a wildcard folder");
            assert_eq!(names("?/d.tar"), ["x/d.tar"]);
            let err = format!("{:#}", expanded(&format!("{root}/*.jpg")).unwrap_err());
            assert!(err.contains(&format!("{root}/*.jpg matches no file")) && err.contains("annotation file (.json"));
        }
        let err = format!("{:#}", expanded("s3://b*/a.tar").unwrap_err());
        assert!(err.contains("not buckets"), "{err}");
    }

    /// An object store (no folders, only keys) as s3://, gs:// and az:// list theirs.
    #[test]
    fn globs_match_object_store_keys() {
        let store = Arc::new(object_store::memory::InMemory::new());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for key in ["shards/t-2.tar", "shards/t-1.tar", "shards/t-1.json", "shards/old/t-0.tar", "other/t-3.tar"] {
            rt.block_on(store.put(&StorePath::from(key), PutPayload::from_static(b"x"))).unwrap();
        }
        let root = Location { store, path: StorePath::default(), url: "mem://bucket".into() };
        let names = |rest: &str| {
            let mut names = rt.block_on(glob(&root, rest)).unwrap();
            names.sort();
            names
        };
        assert_eq!(names("shards/t-*.tar"), ["shards/t-1.tar", "shards/t-2.tar"], "not the key one folder down");
        assert_eq!(names("*/t-?.tar"), ["other/t-3.tar", "shards/t-1.tar", "shards/t-2.tar"]);
        assert_eq!(names("*/old/t-0.tar"), ["shards/old/t-0.tar"]);
        assert!(names("shards/*.jpg").is_empty());
    }

    /// A reader over chunks that `serve(open_count, offset)` gives; a stream that stalls is
    /// `pending` after its chunks.
    /// The chunks an open (numbered from 0, at an offset) serves, and whether it then stalls.
    type Serve = fn(u32, u64) -> (Vec<&'static [u8]>, bool);

    fn fake_reader(serve: Serve, stall: Duration) -> DeadlineReader {
        let opens = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let handle = rt.handle().clone();
        std::mem::forget(rt); // outlives the reader, whose requests it serves
        let open: Opener = Box::new(move |at| {
            let n = opens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (chunks, stalls) = serve(n, at);
            let chunks = futures::stream::iter(chunks.into_iter().map(|c| Ok(bytes::Bytes::from_static(c))));
            let tail = match stalls {
                true => futures::stream::pending().boxed(),
                false => futures::stream::empty().boxed(),
            };
            Box::pin(async move { Ok(chunks.chain(tail).boxed()) })
        });
        DeadlineReader::new(open, handle, 0, stall, "fake://shard.tar".into())
    }

    /// A read that stalls is retried from the next byte it had not received; one that always
    /// stalls fails after STALL_RETRIES retries, within their deadlines, instead of waiting forever.
    #[test]
    fn stalled_reads_are_retried_from_where_they_stopped_then_given_up() {
        let once = |n: u32, at: u64| match (n, at) {
            (0, 0) => (vec![&b"hello "[..], &b"wor"[..]], true),
            (1, 9) => (vec![&b"ld"[..]], false),
            other => panic!("opened again at {other:?}"),
        };
        let mut text = String::new();
        fake_reader(once, Duration::from_millis(50)).read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello world");

        let always = |_: u32, _: u64| (vec![], true);
        let started = std::time::Instant::now();
        let err = fake_reader(always, Duration::from_millis(50)).read_to_end(&mut vec![]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("no byte for 0.05 s, 4 times"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    /// A local file is read whole up to the limit; one over it is refused by its size, unread;
    /// a missing one is an error naming it.
    #[test]
    fn local_files_are_read_up_to_their_limit() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jpg");
        std::fs::write(&path, b"0123456789").unwrap();
        let loc = Location::open(path.to_str().unwrap()).unwrap();
        let read = |max| loc.read_at_most_within(rt.handle(), max, Duration::from_secs(5));
        assert_eq!(read(10).unwrap(), b"0123456789");
        let err = read(9).unwrap_err();
        assert_eq!(err.downcast_ref::<Oversized>().map(|o| o.size), Some(10), "{err:#}");
        let missing = Location::open(dir.path().join("b.jpg").to_str().unwrap()).unwrap();
        let err = missing.read_at_most_within(rt.handle(), 10, Duration::from_secs(5)).unwrap_err();
        assert!(format!("{err:#}").contains("b.jpg"), "{err:#}");
    }

    #[test]
    fn sources_have_folders_without_listing() {
        assert_eq!(folder_of_source("data/train.json").unwrap(), "data");
        assert_eq!(folder_of_source("s3://b/shards/*/t-*.tar").unwrap(), "s3://b/shards");
        assert_eq!(folder_of_source("*.tar").unwrap(), ".");
    }

    #[test]
    fn parents_of_paths_and_urls() {
        assert_eq!(parent_of("data/test.json"), "data");
        assert_eq!(parent_of("test.json"), ".");
        assert_eq!(parent_of("/test.json"), "/");
        assert_eq!(parent_of("s3://bucket/sets/coco/test.json"), "s3://bucket/sets/coco");
    }

    #[test]
    fn local_paths_are_told_from_object_stores() {
        assert_eq!(local_path("runs/a"), Some("runs/a".into()));
        assert_eq!(local_path("file:///tmp/x"), Some("/tmp/x".into()));
        assert_eq!(local_path("s3://b/run"), None);
    }

    #[test]
    fn s3_urls_take_bucket_and_key() {
        let loc = Location::open("s3://bucket/some/prefix/shard.tar").unwrap();
        assert_eq!(loc.path.as_ref(), "some/prefix/shard.tar");
    }
}
