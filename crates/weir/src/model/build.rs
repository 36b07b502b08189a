//! Which weir this is: the crate version and the revision it was built from (set by
//! `build.rs`: git, or `WEIR_BUILD_REVISION` for builds without `.git`, else
//! `unknown`). `weir --version` prints it, the admin API serves it
//! (`GET /api/v1/version`), `weir ctl status` shows the server's.

/// The release version, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The short git revision, with `-dirty` when the tree had uncommitted changes to
/// tracked files, e.g. `abc1234` or `abc1234-dirty`; `unknown` when it could not be told.
pub const REVISION: &str = env!("WEIR_REVISION");

/// Both, as `weir --version` and `weir ctl status` print them: `0.1.0 (abc1234)`.
pub const DESCRIBE: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("WEIR_REVISION"), ")");
