//! The database's files on disk: who may read them, and whether a database
//! was ever there.
//!
//! The database, its `-wal` and `-shm` are owner-only (`0600`), or
//! `0660` with `[store] group`. SQLite creates the `-wal` and `-shm` with the
//! database file's mode, so creating the database file ourselves, with the
//! mode, before SQLite opens it, covers all three.
//!
//! A database deleted under a running server must not come back as a fresh,
//! empty one at the next start (every request, grant and audit entry would be
//! gone, and `audit verify` would call the new chain fine). So the first
//! start writes a marker next to the database (`.NAME.created`, hidden, so
//! `rm keyturn.db*` spares it); later starts create a database only where
//! nothing shows one existed, and `keyturn init` is the explicit way to start
//! over. No sqlx or rusqlite here: plain files only.

use std::fs::{OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why the database files could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error(
        "the database {db} is missing, but {evidence} shows one existed there; \
         refusing to start on a new, empty database (its requests, grants and audit log would be gone). \
         Restore the database from a backup, or run `keyturn init --config FILE` to start an empty one deliberately"
    )]
    Missing { db: PathBuf, evidence: String },
    #[error("the database {0} already exists; `keyturn init` never replaces a database")]
    Exists(PathBuf),
    #[error(
        "{0} is left over from a deleted database (SQLite would replay it into the new one); \
         remove it, then run `keyturn init` again"
    )]
    Leftover(PathBuf),
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("store group `{0}` does not exist (key store.group)")]
    NoSuchGroup(String),
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// When a missing database may be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// `serve`: only where nothing shows a database ever existed.
    IfNeverExisted,
    /// `keyturn init`: always, but never over an existing database.
    Fresh,
}

/// Who may read and write the database files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// `0o600`, or `0o660` with a group.
    pub mode: u32,
    pub gid: Option<u32>,
}

impl Access {
    /// Owner only, or owner and `group` (a name or a gid).
    pub fn new(group: Option<&str>) -> Result<Access, FilesError> {
        let Some(group) = group else {
            return Ok(Access {
                mode: 0o600,
                gid: None,
            });
        };
        let gid = match group.parse::<u32>() {
            Ok(g) => g,
            Err(_) => nix::unistd::Group::from_name(group)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
                .ok_or_else(|| FilesError::NoSuchGroup(group.to_string()))?,
        };
        Ok(Access {
            mode: 0o660,
            gid: Some(gid),
        })
    }

    /// The process umask that keeps new files within this access.
    pub fn umask(&self) -> u32 {
        if self.gid.is_some() {
            0o007
        } else {
            0o077
        }
    }
}

/// The database file's companions: SQLite's own, and the marker.
pub fn wal(db: &Path) -> PathBuf {
    suffixed(db, "-wal")
}

pub fn shm(db: &Path) -> PathBuf {
    suffixed(db, "-shm")
}

/// The marker written when the database is created (or first seen).
pub fn marker(db: &Path) -> PathBuf {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    db.with_file_name(format!(".{name}.created"))
}

fn suffixed(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

fn exists(p: &Path) -> Result<bool, FilesError> {
    match std::fs::symlink_metadata(p) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(p)(e)),
    }
}

/// What [`prepare`] did.
#[derive(Debug, Default)]
pub struct Prepared {
    /// A new, empty database file was created.
    pub created: bool,
    /// The marker, when this start wrote it.
    pub marked: Option<PathBuf>,
    /// Files whose mode or group was too open and was fixed, with what they were.
    pub fixed: Vec<String>,
}

/// Before the store opens: refuses to replace a database that existed,
/// creates a missing one (with its mode) when allowed, writes the marker and
/// tightens the modes of the files already there.
pub fn prepare(db: &Path, access: Access, create: Create) -> Result<Prepared, FilesError> {
    let mut out = Prepared::default();
    let (wal, shm, marker) = (wal(db), shm(db), marker(db));
    if exists(db)? {
        if create == Create::Fresh {
            return Err(FilesError::Exists(db.to_path_buf()));
        }
        if !std::fs::metadata(db).map_err(io(db))?.is_file() {
            return Err(FilesError::NotAFile(db.to_path_buf()));
        }
    } else {
        let leftovers: Vec<&PathBuf> = [&wal, &shm]
            .into_iter()
            .filter(|p| exists(p).unwrap_or(true))
            .collect();
        match create {
            Create::IfNeverExisted => {
                let mut evidence: Vec<String> = Vec::new();
                if exists(&marker)? {
                    evidence.push(format!("the marker {}", marker.display()));
                }
                evidence.extend(leftovers.iter().map(|p| format!("{}", p.display())));
                if !evidence.is_empty() {
                    return Err(FilesError::Missing {
                        db: db.to_path_buf(),
                        evidence: evidence.join(" and "),
                    });
                }
            }
            Create::Fresh => {
                if let Some(p) = leftovers.first() {
                    return Err(FilesError::Leftover(p.to_path_buf()));
                }
            }
        }
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        // create_new: if something appeared meanwhile, it is not ours to truncate.
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(access.mode)
            .open(db)
            .map_err(io(db))?;
        // Exactly the mode, whatever the umask took away.
        f.set_permissions(Permissions::from_mode(access.mode))
            .map_err(io(db))?;
        out.created = true;
    }
    // Written after the database file, so a failure in between leaves a
    // database without a marker (the next start writes it), never the reverse.
    if !exists(&marker)? || create == Create::Fresh {
        write_marker(&marker, access)?;
        out.marked = Some(marker);
    }
    out.fixed = secure(db, access)?;
    Ok(out)
}

fn write_marker(marker: &Path, access: Access) -> Result<(), FilesError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(access.mode)
        .open(marker)
        .map_err(io(marker))?;
    f.set_permissions(Permissions::from_mode(access.mode))
        .map_err(io(marker))?;
    let now = chrono::Utc::now().to_rfc3339();
    writeln!(
        f,
        "Keyturn created or first opened the database next to this file at {now}.\n\
         While this file exists, `keyturn serve` refuses to start on a new, empty\n\
         database in its place. If the database is gone, restore it from a backup,\n\
         or run `keyturn init --config FILE` to start an empty one deliberately."
    )
    .and_then(|()| f.sync_all())
    .map_err(io(marker))
}

/// Gives the database, its `-wal`, `-shm` and marker (those that exist) the
/// mode and group of `access`. Returns what it changed, for the log.
pub fn secure(db: &Path, access: Access) -> Result<Vec<String>, FilesError> {
    let mut fixed = Vec::new();
    for p in [db.to_path_buf(), wal(db), shm(db), marker(db)] {
        let m = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&p)(e)),
        };
        if m.file_type().is_symlink() {
            // Whatever it points to is the operator's choice; not chmodded through.
            continue;
        }
        if !m.is_file() {
            return Err(FilesError::NotAFile(p));
        }
        let mode = m.mode() & 0o777;
        if mode & !access.mode != 0 {
            std::fs::set_permissions(&p, Permissions::from_mode(access.mode)).map_err(io(&p))?;
            fixed.push(format!(
                "{}: mode {mode:04o} -> {:04o}",
                p.display(),
                access.mode
            ));
        }
        if let Some(gid) = access.gid {
            if m.gid() != gid {
                std::os::unix::fs::chown(&p, None, Some(gid)).map_err(io(&p))?;
                fixed.push(format!("{}: group {} -> {gid}", p.display(), m.gid()));
            }
        }
    }
    Ok(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Access {
        Access::new(None).unwrap()
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn a_new_database_is_created_owner_only_with_its_marker() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("k.db");
        let p = prepare(&db, owner(), Create::IfNeverExisted).unwrap();
        assert!(p.created);
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&marker(&db)), 0o600);
        // Second start: the database is there, nothing is created.
        let p = prepare(&db, owner(), Create::IfNeverExisted).unwrap();
        assert!(!p.created && p.fixed.is_empty());
    }

    #[test]
    fn a_database_from_before_the_marker_gets_one() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("k.db");
        std::fs::write(&db, b"").unwrap();
        let p = prepare(&db, owner(), Create::IfNeverExisted).unwrap();
        assert!(!p.created);
        assert_eq!(p.marked, Some(marker(&db)));
        assert!(prepare(&db, owner(), Create::IfNeverExisted)
            .unwrap()
            .marked
            .is_none());
    }

    #[test]
    fn a_deleted_database_is_not_recreated() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("k.db");
        prepare(&db, owner(), Create::IfNeverExisted).unwrap();
        std::fs::remove_file(&db).unwrap();
        let e = prepare(&db, owner(), Create::IfNeverExisted).unwrap_err();
        assert!(matches!(e, FilesError::Missing { .. }), "{e}");
        assert!(e.to_string().contains(".k.db.created"), "{e}");
        assert!(!db.exists());
        // `init` is the deliberate way back.
        assert!(prepare(&db, owner(), Create::Fresh).unwrap().created);
        assert!(matches!(
            prepare(&db, owner(), Create::Fresh).unwrap_err(),
            FilesError::Exists(_)
        ));
    }

    #[test]
    fn a_leftover_wal_counts_as_evidence() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("k.db");
        std::fs::write(wal(&db), b"x").unwrap();
        let e = prepare(&db, owner(), Create::IfNeverExisted).unwrap_err();
        assert!(e.to_string().contains("k.db-wal"), "{e}");
        let e = prepare(&db, owner(), Create::Fresh).unwrap_err();
        assert!(matches!(e, FilesError::Leftover(_)), "{e}");
    }

    #[test]
    fn open_modes_are_tightened() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("k.db");
        for p in [db.clone(), wal(&db), shm(&db)] {
            std::fs::write(&p, b"").unwrap();
            std::fs::set_permissions(&p, Permissions::from_mode(0o644)).unwrap();
        }
        let p = prepare(&db, owner(), Create::IfNeverExisted).unwrap();
        assert_eq!(p.fixed.len(), 3, "{:?}", p.fixed);
        for f in [db.clone(), wal(&db), shm(&db)] {
            assert_eq!(mode(&f), 0o600);
        }
    }

    #[test]
    fn a_group_gets_0660_and_the_group() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("k.db");
        let gid = nix::unistd::getgid().as_raw();
        let a = Access::new(Some(&gid.to_string())).unwrap();
        assert_eq!(a.umask(), 0o007);
        assert_eq!(owner().umask(), 0o077);
        prepare(&db, a, Create::IfNeverExisted).unwrap();
        assert_eq!(mode(&db), 0o660);
        assert_eq!(std::fs::metadata(&db).unwrap().gid(), gid);
        assert!(matches!(
            Access::new(Some("no-such-group-keyturn")),
            Err(FilesError::NoSuchGroup(_))
        ));
    }
}
