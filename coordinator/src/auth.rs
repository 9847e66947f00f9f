//! API keys (`--api-keys FILE`): who may use the client APIs, each key's limits (requests and
//! tokens per minute), and what each has used.
//!
//! The file holds one key per line, `NAME KEY [rpm=N] [tpm=N] [admin]` (`#` starts a comment).
//! Keys are kept as SHA-256 digests and a presented key is compared with every one in constant
//! time; names, never secrets, appear in metrics, logs and `tramctl usage`. Without a file
//! every request is served (a local cluster). The file is read again on SIGHUP: requests in
//! flight go on, usage counts are kept by name.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// One key of the file.
#[derive(Debug, Clone)]
struct Key {
    name: Arc<str>,
    digest: [u8; 32],
    rpm: Option<u64>,
    tpm: Option<u64>,
    admin: bool,
}

/// A line of the key file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {reason}")]
pub struct KeyFileError {
    path: String,
    line: usize,
    reason: String,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuthError {
    #[error("an API key is required: send `Authorization: Bearer KEY`")]
    Missing,
    #[error("the API key is not valid")]
    Invalid,
    #[error("the API key {0:?} may not call the admin API")]
    NotAdmin(String),
    #[error("the API key {name:?} used its {limit} limit: retry in {} s", retry_after.as_secs().max(1))]
    Limited { name: String, limit: &'static str, retry_after: Duration },
}

/// Who made a request (a key's name); `None` without API keys.
pub type Caller = Option<Arc<str>>;

/// Totals of one key since the coordinator started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyUsage {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
}

/// A key's use within the last minute.
#[derive(Debug, Default)]
struct Window {
    requests: VecDeque<Instant>,
    tokens: VecDeque<(Instant, u64)>,
}

const MINUTE: Duration = Duration::from_secs(60);

impl Window {
    fn expire(&mut self, now: Instant) {
        while self.requests.front().is_some_and(|&t| now - t >= MINUTE) {
            self.requests.pop_front();
        }
        while self.tokens.front().is_some_and(|&(t, _)| now - t >= MINUTE) {
            self.tokens.pop_front();
        }
    }
}

/// The keys in force, their windows and usage (shared by both APIs).
#[derive(Clone, Default)]
pub struct Auth {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    file: Option<PathBuf>,
    keys: RwLock<Arc<Vec<Key>>>,
    state: Mutex<HashMap<Arc<str>, (Window, KeyUsage)>>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equal in time that does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse(path: &Path, text: &str) -> Result<Vec<Key>, KeyFileError> {
    let mut keys: Vec<Key> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |reason: String| KeyFileError { path: path.display().to_string(), line: i + 1, reason };
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(secret)) = (words.next(), words.next()) else {
            return Err(err("expected `NAME KEY [rpm=N] [tpm=N] [admin]`".into()));
        };
        if secret.len() < 16 {
            return Err(err(format!("the key of {name:?} is shorter than 16 characters")));
        }
        let mut key = Key { name: name.into(), digest: digest(secret), rpm: None, tpm: None, admin: false };
        for word in words {
            let number = |v: &str| v.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| err(format!("{word:?}: expected a number >= 1")));
            match word.split_once('=') {
                Some(("rpm", v)) => key.rpm = Some(number(v)?),
                Some(("tpm", v)) => key.tpm = Some(number(v)?),
                None if word == "admin" => key.admin = true,
                _ => return Err(err(format!("unknown option {word:?} (rpm=N, tpm=N, admin)"))),
            }
        }
        if keys.iter().any(|k| k.name == key.name) {
            return Err(err(format!("the name {name:?} is given twice")));
        }
        if keys.iter().any(|k| same(&k.digest, &key.digest)) {
            return Err(err(format!("the key of {name:?} is another name's")));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(KeyFileError { path: path.display().to_string(), line: 0, reason: "no key: every request would be refused".into() });
    }
    Ok(keys)
}

impl Auth {
    /// No keys: every request is served.
    pub fn open() -> Self {
        Auth::default()
    }

    /// The keys of `path`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let auth = Auth { inner: Arc::new(Inner { file: Some(path.to_owned()), ..Inner::default() }) };
        auth.reload()?;
        Ok(auth)
    }

    /// Whether keys are required.
    pub fn enabled(&self) -> bool {
        self.inner.file.is_some()
    }

    /// Reads the key file again (on SIGHUP); a file that cannot be read keeps the keys in force.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let Some(path) = &self.inner.file else { return Ok(0) };
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let keys = parse(path, &text)?;
        let n = keys.len();
        *self.inner.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    fn key(&self, presented: &str) -> Option<Key> {
        let d = digest(presented);
        let keys = self.inner.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        // Every key compared, the match kept: no early exit.
        keys.iter().fold(None, |found, k| if same(&k.digest, &d) { Some(k.clone()) } else { found })
    }

    /// The caller of a request with this `Authorization` value (`Bearer KEY`, or the key
    /// alone), checked against the keys and, for `admin`, the admin mark.
    pub fn authenticate(&self, authorization: Option<&str>, admin: bool) -> Result<Caller, AuthError> {
        if !self.enabled() {
            return Ok(None);
        }
        let presented = authorization.map(|v| v.trim()).ok_or(AuthError::Missing)?;
        let presented = presented.strip_prefix("Bearer ").or_else(|| presented.strip_prefix("bearer ")).unwrap_or(presented).trim();
        let key = self.key(presented).ok_or(AuthError::Invalid)?;
        if admin && !key.admin {
            return Err(AuthError::NotAdmin(key.name.to_string()));
        }
        Ok(Some(key.name))
    }

    /// Admits one request of `caller` under its key's limits (requests and tokens per minute),
    /// counting it.
    pub fn admit(&self, caller: &Caller) -> Result<(), AuthError> {
        let Some(name) = caller else { return Ok(()) };
        let limits = self.inner.keys.read().unwrap_or_else(|p| p.into_inner()).iter().find(|k| &k.name == name).map(|k| (k.rpm, k.tpm));
        let (rpm, tpm) = limits.unwrap_or((None, None));
        let now = Instant::now();
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let (window, usage) = state.entry(name.clone()).or_default();
        window.expire(now);
        let limited =
            |limit: &'static str, since: Instant| AuthError::Limited { name: name.to_string(), limit, retry_after: MINUTE.saturating_sub(now - since) };
        if let Some(rpm) = rpm
            && window.requests.len() as u64 >= rpm
        {
            return Err(limited("requests per minute", window.requests[0]));
        }
        if let Some(tpm) = tpm
            && window.tokens.iter().map(|&(_, n)| n).sum::<u64>() >= tpm
        {
            return Err(limited("tokens per minute", window.tokens[0].0));
        }
        window.requests.push_back(now);
        usage.requests += 1;
        Ok(())
    }

    /// Counts the usage a response reported to `caller`.
    pub fn record(&self, caller: &Caller, prompt: usize, cached: usize, completion: usize) {
        let Some(name) = caller else { return };
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let (window, usage) = state.entry(name.clone()).or_default();
        window.tokens.push_back((Instant::now(), (prompt + completion) as u64));
        usage.prompt_tokens += prompt as u64;
        usage.cached_tokens += cached as u64;
        usage.completion_tokens += completion as u64;
    }

    /// Every key's totals since start, by name.
    pub fn usage(&self) -> Vec<(String, KeyUsage)> {
        let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, KeyUsage)> = state.iter().map(|(name, (_, u))| (name.to_string(), *u)).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(text: &str) -> Auth {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, text).unwrap();
        let auth = Auth::from_file(&path).unwrap();
        std::mem::forget(dir);
        auth
    }

    #[test]
    fn keys_are_checked_and_the_file_refuses_mistakes() {
        let a = auth("# team keys\nalice sk-alice-0123456789 rpm=2\nops sk-ops-0123456789abcd admin\n");
        assert_eq!(a.authenticate(Some("Bearer sk-alice-0123456789"), false), Ok(Some("alice".into())));
        assert_eq!(a.authenticate(Some("sk-alice-0123456789"), false), Ok(Some("alice".into())));
        assert_eq!(a.authenticate(None, false), Err(AuthError::Missing));
        assert_eq!(a.authenticate(Some("Bearer sk-alice-0123456780"), false), Err(AuthError::Invalid));
        assert_eq!(a.authenticate(Some("Bearer sk-alice-0123456789"), true), Err(AuthError::NotAdmin("alice".into())));
        assert_eq!(a.authenticate(Some("Bearer sk-ops-0123456789abcd"), true), Ok(Some("ops".into())));
        assert!(Auth::open().authenticate(None, true).unwrap().is_none());
        let p = Path::new("k");
        assert!(parse(p, "a short\n").unwrap_err().to_string().contains("16"));
        assert!(parse(p, "a 0123456789abcdef rps=3\n").unwrap_err().to_string().contains("k:1"));
        assert!(parse(p, "a 0123456789abcdef\na 0123456789abcdeg\n").unwrap_err().to_string().contains("twice"));
        assert!(parse(p, "# nothing\n").is_err());
    }

    #[test]
    fn limits_refuse_past_their_minute_and_usage_adds_up() {
        let a = auth("alice sk-alice-0123456789 rpm=2\nbob sk-bob-0123456789xx tpm=100\n");
        let alice = Some(Arc::from("alice"));
        assert!(a.admit(&alice).is_ok() && a.admit(&alice).is_ok());
        let Err(AuthError::Limited { limit, retry_after, .. }) = a.admit(&alice) else { panic!("the third request of the minute") };
        assert_eq!(limit, "requests per minute");
        assert!(retry_after > Duration::from_secs(55));
        let bob = Some(Arc::from("bob"));
        a.admit(&bob).unwrap();
        a.record(&bob, 60, 16, 50);
        assert!(matches!(a.admit(&bob), Err(AuthError::Limited { limit: "tokens per minute", .. })));
        let usage = a.usage();
        assert_eq!(usage[1], ("bob".into(), KeyUsage { requests: 1, prompt_tokens: 60, cached_tokens: 16, completion_tokens: 50 }));
        assert_eq!(usage[0].1.requests, 2);
    }
}
