//! The end-to-end tests: one test binary with one module per area, so the harness and the
//! dependencies link once. Every test runs the real `sandboxd`, `sandboxd-helper` and `sbx`
//! binaries (see the `sandboxd_tests` harness); a test of both modes is one function
//! `test(mode: Mode)` that `both_modes!(test)` runs once per mode (`area::test::privileged`,
//! `area::test::rootless`), so a failure in one mode never hides the result of the other.

#![allow(clippy::unwrap_used)] // Test code: a panic is the failure report.

mod api;
mod auth;
mod browser;
mod cli;
mod cli_habits;
mod egress;
mod egress_hub;
mod exec;
mod files;
mod hostile;
mod images;
mod isolation;
mod lifecycle;
mod limits;
mod logs;
mod network;
mod process_model;
mod seccomp;
mod smoke;
mod transport;
