//! The credential broker: reads `[credentials.NAME]` sources, fails over
//! between auth profiles, re-reads on SIGHUP or when a file changes.
