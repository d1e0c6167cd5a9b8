/* Run inside a sandbox: tries syscalls the seccomp filter must deny and a few it must allow,
 * and prints one line per probe: "<name> ok" or "<name> <ERRNO NAME>". */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/keyctl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/personality.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *name, long rc) {
    if (rc == -1) {
        const char *e = strerrorname_np(errno);
        printf("%s %s\n", name, e ? e : "?");
    } else {
        printf("%s ok\n", name);
    }
    fflush(stdout);
}

/* A raw clone-like call that might succeed: the child leaves at once. */
static long forking(long rc) {
    if (rc == 0)
        _exit(0);
    if (rc > 0)
        waitpid((pid_t)rc, NULL, 0);
    return rc;
}

static void *thread_main(void *arg) { return arg; }

int main(void) {
    /* Never probe unfiltered: as root on a host, mount() and friends would succeed. */
    if (prctl(PR_GET_SECCOMP) != 2) {
        printf("not under a seccomp filter: refusing to probe\n");
        return 1;
    }
    report("keyctl", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0));
    report("add_key", syscall(SYS_add_key, "user", "probe", "x", 1, KEY_SPEC_SESSION_KEYRING));
    report("bpf", syscall(SYS_bpf, 0, NULL, 0));
    report("perf_event_open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
    report("userfaultfd", syscall(SYS_userfaultfd, 0));
    report("io_uring_setup", syscall(SYS_io_uring_setup, 1, NULL));
    report("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    report("init_module", syscall(SYS_init_module, NULL, 0, ""));
    report("mount", mount("none", "/tmp", "tmpfs", 0, NULL));
    report("setns", syscall(SYS_setns, -1, 0));
    report("unshare_newuser", unshare(CLONE_NEWUSER));
    report("clone_newuser", forking(syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)));
    uint64_t args[11] = {0};
    args[4] = SIGCHLD; /* exit_signal */
    report("clone3", forking(syscall(SYS_clone3, args, sizeof args)));
    report("personality_no_aslr", personality(ADDR_NO_RANDOMIZE));
#ifdef __x86_64__
    /* The x32 ABI's getpid: same number with bit 30 set. */
    report("x32_getpid", syscall(0x40000000 | SYS_getpid));
#endif
    /* Allowed. */
    report("getpid", syscall(SYS_getpid) > 0 ? 0 : -1);
    report("personality_query", personality(0xffffffff));
    pid_t child = fork();
    if (child == 0)
        _exit(7);
    int status = 0;
    report("fork", child > 0 && waitpid(child, &status, 0) == child && WIFEXITED(status) &&
                           WEXITSTATUS(status) == 7
                       ? 0
                       : -1);
    pthread_t thread;
    errno = pthread_create(&thread, NULL, thread_main, NULL);
    report("pthread_create", errno == 0 && pthread_join(thread, NULL) == 0 ? 0 : -1);
#ifdef __x86_64__
    /* The i386 ABI (int 0x80): a foreign architecture, so the process is killed (SIGSYS). */
    child = fork();
    if (child == 0) {
        long rc;
        __asm__ volatile("int $0x80" : "=a"(rc) : "a"(20) : "memory"); /* i386 getpid */
        _exit(0);
    }
    status = 0;
    waitpid(child, &status, 0);
    if (WIFSIGNALED(status))
        printf("i386_getpid signal %d\n", WTERMSIG(status));
    else
        printf("i386_getpid exit %d\n", WEXITSTATUS(status));
#endif
    return 0;
}
