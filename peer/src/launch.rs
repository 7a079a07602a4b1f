//! What `fbpkg-rs run` executes for a cached version, and the exec that hands the process over.
//!
//! A file package runs the file (installed `r-x` when published with its execute bit); a
//! directory package runs its entrypoint, the path recorded in its metainfo
//! ([`Entrypoint`]), so every host runs the same program and knows which with no network. The
//! entrypoint is resolved inside the extracted tree with every symlink followed, and must still
//! be inside it: the archive extractor already refuses escaping links, this is the check at the
//! point of use. The same check runs at publish time on the source directory
//! ([`resolve_entrypoint`]), so a version that cannot run is refused before it is made.
//!
//! The program *replaces* the caller ([`exec`]): its exit status and the signals that end it
//! are the caller's own, no parent waits or forwards anything, and the version's in-use hold
//! ([`InUse`]) is inherited across exec, so the version stays in the cache for as long as the
//! program (or any child that keeps the descriptor) runs. std's exec restores the default
//! signal state first (SIGPIPE, which Rust ignores, and the signal mask).
//!
//! What the program gets: the arguments verbatim, the caller's environment and working
//! directory, plus `FBPKG_PACKAGE_DIR` (the tree of a directory package, the entry directory
//! of a file package) and `FBPKG_PACKAGE_REF` (`name:<sha256>`).

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Read as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use fbpkg_common::Sha256Hash;
use fbpkg_common::entrypoint::Entrypoint;
use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_common::pkgref::PackageName;

use crate::cache::{CachedPackage, InUse, METAINFO_FILE};
use crate::error::{PeerError, Result};

/// The directory of the running package, for the program: its tree, or its cache entry.
pub const PACKAGE_DIR_VAR: &str = "FBPKG_PACKAGE_DIR";
/// The running version, for the program: `name:<sha256>`.
pub const PACKAGE_REF_VAR: &str = "FBPKG_PACKAGE_REF";

/// Why an entrypoint cannot be run from a tree.
#[derive(Debug)]
pub enum BadEntrypoint {
    /// Nothing at that path (or a link to nothing).
    Missing,
    /// Following links leads out of the tree, to this path.
    Outside(PathBuf),
    /// A directory, a device, a FIFO, …
    NotAFile,
    /// A regular file without any execute bit.
    NotExecutable,
    /// The tree could not be read.
    Io(io::Error),
}

impl fmt::Display for BadEntrypoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadEntrypoint::Missing => f.write_str("it does not exist (or is a link to nothing)"),
            BadEntrypoint::Outside(to) => {
                write!(f, "it leads outside the package, to {}", to.display())
            }
            BadEntrypoint::NotAFile => f.write_str("it is not a regular file"),
            BadEntrypoint::NotExecutable => {
                f.write_str("it is not executable (no execute bit; chmod +x it)")
            }
            BadEntrypoint::Io(e) => write!(f, "it cannot be read: {e}"),
        }
    }
}

/// The executable `entrypoint` names in `tree`, with every link followed: an executable
/// regular file inside `tree`.
pub fn resolve_entrypoint(
    tree: &Path,
    entrypoint: &Entrypoint,
) -> std::result::Result<PathBuf, BadEntrypoint> {
    let root = fs::canonicalize(tree).map_err(BadEntrypoint::Io)?;
    let path = match fs::canonicalize(root.join(entrypoint.as_str())) {
        Ok(p) => p,
        // ENOTDIR: a file where the path wants a directory, so nothing is there either.
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            return Err(BadEntrypoint::Missing);
        }
        Err(e) => return Err(BadEntrypoint::Io(e)),
    };
    if !path.starts_with(&root) {
        return Err(BadEntrypoint::Outside(path));
    }
    let meta = fs::metadata(&path).map_err(BadEntrypoint::Io)?;
    if !meta.is_file() {
        return Err(BadEntrypoint::NotAFile);
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(BadEntrypoint::NotExecutable);
    }
    Ok(path)
}

/// What to exec for one cached version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The file handed to exec (absolute; for an entrypoint, with links resolved).
    pub program: PathBuf,
    /// The program's `argv[0]`: the path as the package names it, so a multi-call binary
    /// reached through a link (`bin/tool -> busybox`) still sees the name it was called by.
    pub arg0: OsString,
    /// [`PACKAGE_DIR_VAR`].
    pub package_dir: PathBuf,
    /// [`PACKAGE_REF_VAR`].
    pub reference: String,
}

/// The metainfo kept in a cache entry, checked to be the version's.
pub fn entry_metainfo(entry: &CachedPackage, sha256: &Sha256Hash) -> Result<Metainfo> {
    let path = entry.dir.join(METAINFO_FILE);
    let bytes = crate::cache::read_own(&path, crate::cache::METAINFO_CAP)
        .map_err(PeerError::io("reading", &path))?;
    let meta = Metainfo::parse(&bytes)
        .map_err(|e| PeerError::Verification(format!("{}: {e}", path.display())))?;
    if meta.sha256 != *sha256 {
        return Err(PeerError::Verification(format!(
            "{} describes {}, not {sha256}",
            path.display(),
            meta.sha256
        )));
    }
    Ok(meta)
}

/// What running `name:sha256`, found at `entry` and described by `meta`, executes.
pub fn plan(
    name: &PackageName,
    sha256: &Sha256Hash,
    entry: &CachedPackage,
    meta: &Metainfo,
) -> Result<Launch> {
    let reference = format!("{name}:{sha256}");
    let absolute = |p: &Path| std::path::absolute(p).map_err(PeerError::io("making absolute", p));
    match meta.format {
        Format::File => Err(PeerError::NotRunnable(format!(
            "{reference} cannot be run: it is a file package published without its execute bit \
             (format: file); publish it again after `chmod +x`, or read it with `fbpkg-rs get`"
        ))),
        Format::Executable => {
            let program = absolute(&entry.launch_path)?;
            Ok(Launch {
                arg0: program.clone().into_os_string(),
                program,
                package_dir: absolute(&entry.dir)?,
                reference,
            })
        }
        Format::TarZst | Format::Tree => {
            let Some(entrypoint) = &meta.entrypoint else {
                return Err(PeerError::NotRunnable(format!(
                    "{reference} cannot be run: it is a directory package published without an \
                     entrypoint; publish it with `fbpkg-rs publish {name} DIR --entrypoint \
                     bin/tool` (a path inside DIR), or run a program in it by path: \
                     \"$(fbpkg-rs get {reference})/bin/tool\""
                )));
            };
            let tree = absolute(&entry.launch_path)?;
            let program = resolve_entrypoint(&tree, entrypoint).map_err(|why| {
                let msg = format!("{reference}: cannot run entrypoint {entrypoint:?}: {why}");
                match why {
                    BadEntrypoint::Missing => PeerError::ProgramMissing(msg),
                    BadEntrypoint::Io(source) => PeerError::Io {
                        context: "resolving the entrypoint",
                        path: tree.join(entrypoint.as_str()),
                        source,
                    },
                    _ => PeerError::NotRunnable(msg),
                }
            })?;
            Ok(Launch {
                arg0: tree.join(entrypoint.as_str()).into_os_string(),
                program,
                package_dir: tree,
                reference,
            })
        }
    }
}

/// Replace this process with `launch`'s program, `args` passed verbatim, keeping `hold`
/// across exec. Returns only if exec failed, with why.
pub fn exec(launch: &Launch, args: &[OsString], hold: InUse) -> PeerError {
    if let Err(e) = hold.inherit() {
        return e;
    }
    let err = Command::new(&launch.program)
        .arg0(&launch.arg0)
        .args(args)
        .env(PACKAGE_DIR_VAR, &launch.package_dir)
        .env(PACKAGE_REF_VAR, &launch.reference)
        .exec();
    // Still here: the program never started, so the version is no longer in use by it.
    drop(hold);
    exec_error(&launch.program, &err)
}

/// A failed exec as the error a user can act on. ENOENT after the program was found means
/// what it asks the kernel to load is missing: the `#!` interpreter, or an ELF loader.
fn exec_error(program: &Path, err: &io::Error) -> PeerError {
    let shown = program.display();
    match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => {
            PeerError::ProgramMissing(match interpreter(program) {
                Some(interp) => format!(
                    "cannot run {shown}: its interpreter {interp} (from its #! line) does not exist"
                ),
                None => format!(
                    "cannot run {shown}: it does not exist, or the dynamic loader it names is missing"
                ),
            })
        }
        Some(libc::EACCES) => PeerError::NotRunnable(format!(
            "cannot run {shown}: permission denied (no execute permission on it or its #! \
             interpreter, or a file system mounted noexec)"
        )),
        Some(libc::ENOEXEC) => PeerError::NotRunnable(format!(
            "cannot run {shown}: not a format this system can execute (a script needs a #! line)"
        )),
        _ => PeerError::NotRunnable(format!("cannot run {shown}: {err}")),
    }
}

/// The interpreter a `#!` line names, if the file starts with one.
fn interpreter(program: &Path) -> Option<String> {
    // Linux reads at most 256 bytes of a #! line.
    let mut head = [0u8; 256];
    let mut f = fs::File::open(program).ok()?;
    let n = f.read(&mut head).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = line.split(|&b| b == b'\n').next()?;
    let text = String::from_utf8_lossy(line);
    text.split_whitespace().next().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn exe(path: &Path, body: &str) {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).expect("mkdir");
        }
        fs::write(path, body).expect("write");
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    fn ep(s: &str) -> Entrypoint {
        Entrypoint::new(s).expect("valid entrypoint")
    }

    #[test]
    fn entrypoint_resolves_to_an_executable_inside_the_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        exe(&tree.join("libexec/tool-1.2"), "#!/bin/sh\n");
        symlink("../libexec/tool-1.2", tree.join("bin-tool")).expect("link");
        fs::create_dir_all(tree.join("bin")).expect("mkdir");
        symlink("../libexec/tool-1.2", tree.join("bin/tool")).expect("link");
        let real = fs::canonicalize(tree.join("libexec/tool-1.2")).expect("canonical");
        assert_eq!(
            resolve_entrypoint(&tree, &ep("libexec/tool-1.2")).expect("file"),
            real
        );
        assert_eq!(
            resolve_entrypoint(&tree, &ep("bin/tool")).expect("link"),
            real
        );
    }

    #[test]
    fn entrypoint_problems_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        exe(&dir.path().join("outside"), "#!/bin/sh\n");
        exe(&tree.join("bin/tool"), "#!/bin/sh\n");
        fs::write(tree.join("data.txt"), "x").expect("write");
        fs::set_permissions(tree.join("data.txt"), fs::Permissions::from_mode(0o644))
            .expect("chmod");
        symlink("../outside", tree.join("escape")).expect("link");
        symlink(dir.path().join("outside"), tree.join("absolute")).expect("link");
        symlink("nowhere", tree.join("dangling")).expect("link");
        symlink(".", tree.join("self")).expect("link");
        let kind = |e: &BadEntrypoint| match e {
            BadEntrypoint::Missing => "missing",
            BadEntrypoint::Outside(_) => "outside",
            BadEntrypoint::NotAFile => "not a file",
            BadEntrypoint::NotExecutable => "not executable",
            BadEntrypoint::Io(_) => "io",
        };
        for (path, expected) in [
            ("missing", "missing"),
            ("dangling", "missing"),
            ("data.txt/x", "missing"),
            ("escape", "outside"),
            ("absolute", "outside"),
            ("bin", "not a file"),
            ("data.txt", "not executable"),
        ] {
            let err = resolve_entrypoint(&tree, &ep(path)).expect_err(path);
            assert_eq!(kind(&err), expected, "{path}: {err:?}");
        }
        // A link to the tree itself is the tree, not a program in it.
        assert!(matches!(
            resolve_entrypoint(&tree, &ep("self")),
            Err(BadEntrypoint::NotAFile)
        ));
        let shown = BadEntrypoint::NotExecutable.to_string();
        assert!(shown.contains("chmod +x"), "{shown}");
    }

    #[test]
    fn exec_errors_say_what_to_fix_and_pick_the_exit_code() {
        use crate::cli::exit;
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("script");
        exe(&script, "#!/no/such/interpreter -x\necho\n");
        let enoent = io::Error::from_raw_os_error(libc::ENOENT);
        let e = exec_error(&script, &enoent);
        assert_eq!(e.exit_code(), exit::PROGRAM_MISSING);
        assert!(e.to_string().contains("/no/such/interpreter"), "{e}");
        let binary = dir.path().join("binary");
        exe(&binary, "\x7fELF");
        let e = exec_error(&binary, &enoent);
        assert!(e.to_string().contains("loader"), "{e}");
        for (errno, needle) in [
            (libc::EACCES, "permission denied"),
            (libc::ENOEXEC, "#! line"),
            (libc::ETXTBSY, "cannot run"),
        ] {
            let e = exec_error(&script, &io::Error::from_raw_os_error(errno));
            assert_eq!(e.exit_code(), exit::NOT_RUNNABLE, "{e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }
}
