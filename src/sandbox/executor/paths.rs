//! Resolving a path slot's value through the file system: symlinks are
//! followed and the result must stay under one of the (resolved) roots.
//! Error texts name the rule and the path, nothing else of the file system
//! beyond where a symlink leads.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

/// Most symlinks followed at the last component of a path that need not
/// exist (the kernel's own limit is 40).
const MAX_LINKS: usize = 40;

/// Resolves `path` (absolute, lexically checked) through symlinks and
/// checks that it is under one of `roots` (themselves resolved; roots that
/// do not exist are ignored). With `must_exist`, the path must exist;
/// otherwise its parent must, and a last component that is a symlink
/// (even a dangling one) is resolved too, so writing to the result cannot
/// land outside the roots. Returns the resolved path.
pub fn resolve_path(path: &str, roots: &[String], must_exist: bool) -> Result<String, String> {
    let resolved_roots: Vec<PathBuf> = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    let shown_roots = roots.join(", ");
    if resolved_roots.is_empty() {
        return Err(format!(
            "none of the allowed roots ({shown_roots}) exists on this host"
        ));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("`{path}` is not an absolute path"));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("`{path}` may not contain `..`"));
    }
    let real = if must_exist {
        std::fs::canonicalize(p).map_err(|e| match e.kind() {
            ErrorKind::NotFound => format!("`{path}` does not exist"),
            ErrorKind::PermissionDenied => format!("`{path}` cannot be read (permission denied)"),
            _ => format!("`{path}` cannot be resolved"),
        })?
    } else {
        resolve_maybe_missing(p, path, 0)?
    };
    if !resolved_roots.iter().any(|r| real.starts_with(r)) {
        let lexically_inside = roots.iter().any(|r| p.starts_with(r));
        return Err(if lexically_inside || real != p {
            format!(
                "`{path}` resolves through a symlink to `{}`, outside the allowed roots ({shown_roots})",
                real.display()
            )
        } else {
            format!("`{path}` is outside the allowed roots ({shown_roots})")
        });
    }
    real.into_os_string()
        .into_string()
        .map_err(|_| format!("`{path}` resolves to a path that is not UTF-8"))
}

/// The resolved form of `p`, whose last component may be missing.
fn resolve_maybe_missing(p: &Path, shown: &str, depth: usize) -> Result<PathBuf, String> {
    if depth > MAX_LINKS {
        return Err(format!("`{shown}`: too many levels of symlinks"));
    }
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() => {
            let target = std::fs::read_link(p)
                .map_err(|_| format!("`{shown}`: the symlink cannot be read"))?;
            let parent = p.parent().unwrap_or(Path::new("/"));
            let next = parent.join(target);
            // `..` in a link target is legitimate: resolve the target's parent.
            let (dir, name) = split(&next, shown)?;
            let dir = std::fs::canonicalize(dir).map_err(|_| {
                format!("`{shown}`: the symlink points into a directory that does not exist")
            })?;
            resolve_maybe_missing(&dir.join(name), shown, depth + 1)
        }
        Ok(_) => std::fs::canonicalize(p).map_err(|_| format!("`{shown}` cannot be resolved")),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let (dir, name) = split(p, shown)?;
            let dir = std::fs::canonicalize(dir)
                .map_err(|_| format!("the directory of `{shown}` does not exist"))?;
            Ok(dir.join(name))
        }
        Err(_) => Err(format!("`{shown}` cannot be resolved")),
    }
}

/// Splits a path into its directory and a last component that is a name.
fn split<'a>(p: &'a Path, shown: &str) -> Result<(&'a Path, &'a std::ffi::OsStr), String> {
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) if p.components().next_back() != Some(Component::ParentDir) => {
            Ok((dir, name))
        }
        _ => Err(format!("`{shown}` does not name a file")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_are_followed_and_confined() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("f"), b"x").unwrap();
        symlink("/etc", root.join("out")).unwrap();
        symlink("f", root.join("in")).unwrap();
        symlink("/etc/keyturn-nope", root.join("dangling")).unwrap();
        let roots = vec![root.to_string_lossy().into_owned()];
        let r = |p: &str, must: bool| resolve_path(&format!("{}/{p}", roots[0]), &roots, must);
        assert!(r("in", true).unwrap().ends_with("/root/f"));
        let e = r("out", true).unwrap_err();
        assert!(e.contains("resolves through a symlink to `/etc`"), "{e}");
        assert!(r("out/passwd", true).unwrap_err().contains("outside"));
        assert!(r("new", false).unwrap().ends_with("/root/new"));
        assert!(r("dangling", false).unwrap_err().contains("outside"));
        assert!(r("out/new", false).unwrap_err().contains("outside"));
        assert!(r("missing", true).unwrap_err().contains("does not exist"));
        assert!(r("nodir/new", false).is_err());
        assert!(resolve_path("/etc/passwd", &roots, true)
            .unwrap_err()
            .contains("outside the allowed roots"));
    }
}
