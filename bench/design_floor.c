/*
 * The kernel work of one jobsvc job, and nothing else: what any implementation of this design pays per job on the
 * host, whatever its language (bench/churn.py's "design floor" baseline; not part of jobsvc).
 *
 *   design_floor N UID GID DIRS PARENT...
 *
 * N times: make a group in each PARENT (one per cgroup hierarchy) and three directories in DIRS (working dir,
 * private /tmp and /var/tmp); fork a child that joins the groups, makes its session, mount and IPC namespaces with
 * jobsvc's mounts (the two private dirs bound on /tmp and /var/tmp, tmpfs on /dev/shm and /run/lock, mqueue, a proc
 * with hidepid=invisible), drops to UID:GID, enters its working dir and execs /bin/true with stdio on /dev/null;
 * reap it; remove the groups and directories. No records, no pipes, no RPCs, no server.
 *
 * Prints "<seconds> <jobs>" on success; on any failure a message on stderr and exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PARENTS 16

enum stage { ST_OK, ST_SESSION, ST_CGROUP, ST_NAMESPACES, ST_MOUNTS, ST_STDIO, ST_USER, ST_CWD, ST_EXEC };
static const char *stage_names[] = {"ok", "session", "cgroup", "namespaces", "mounts", "stdio", "user", "cwd", "exec"};

static void child(char **procs, int nprocs, const char *tmp, const char *vartmp, const char *cwd, uid_t uid,
                  gid_t gid) {
    int err = fcntl(2, F_DUPFD_CLOEXEC, 3);  /* the parent's stderr, for a failure after stdio moves */
    int st = ST_SESSION;
    if (setsid() < 0) goto fail;
    st = ST_CGROUP;
    for (int k = 0; k < nprocs; k++) {
        int fd = open(procs[k], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0", 1) != 1) goto fail;
        close(fd);
    }
    st = ST_NAMESPACES;
    if (unshare(CLONE_NEWNS | CLONE_NEWIPC) != 0) goto fail;
    st = ST_MOUNTS;
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) goto fail;
    if (mount(tmp, "/tmp", NULL, MS_BIND, NULL) != 0) goto fail;
    if (mount(vartmp, "/var/tmp", NULL, MS_BIND, NULL) != 0) goto fail;
    if (access("/dev/shm", F_OK) == 0 && mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") != 0)
        goto fail;
    if (access("/run/lock", F_OK) == 0 &&
        mount("tmpfs", "/run/lock", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=5m") != 0)
        goto fail;
    if (access("/dev/mqueue", F_OK) == 0 &&
        mount("mqueue", "/dev/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0)
        goto fail;
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible") != 0) goto fail;
    st = ST_STDIO;
    int null = open("/dev/null", O_RDWR);
    if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0) goto fail;
    if (null > 2) close(null);
    st = ST_USER;
    /* raw syscalls, as a vfork'd or cloned launcher would have to (glibc's wrappers signal every thread) */
    if (syscall(SYS_setgroups, 0, NULL) != 0 || syscall(SYS_setgid, gid) != 0 || syscall(SYS_setuid, uid) != 0)
        goto fail;
    st = ST_CWD;
    if (chdir(cwd) != 0) goto fail;
    st = ST_EXEC;
    char *argv[] = {"true", NULL};
    char *envp[] = {"PATH=/usr/bin:/bin", NULL};
    execve("/bin/true", argv, envp);
fail:
    if (err >= 0) dprintf(err, "design_floor: child: %s: %s\n", stage_names[st], strerror(errno));
    _exit(100 + st);
}

static int make_dir(const char *path, mode_t mode) {
    if (mkdir(path, mode) != 0) {
        fprintf(stderr, "design_floor: mkdir %s: %s\n", path, strerror(errno));
        return -1;
    }
    return 0;
}

static int remove_dir(const char *path) {
    for (int tries = 0; rmdir(path) != 0; tries++) {
        if (errno != EBUSY || tries > 100000) {  /* a group is busy until its last task has left */
            fprintf(stderr, "design_floor: rmdir %s: %s\n", path, strerror(errno));
            return -1;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 6 || argc - 5 > MAX_PARENTS) {
        fprintf(stderr, "usage: design_floor N UID GID DIRS PARENT... (at most %d parents)\n", MAX_PARENTS);
        return 2;
    }
    long n = strtol(argv[1], NULL, 10);
    uid_t uid = (uid_t)strtoul(argv[2], NULL, 10);
    gid_t gid = (gid_t)strtoul(argv[3], NULL, 10);
    const char *dirs = argv[4];
    int nparents = argc - 5;
    char groups[MAX_PARENTS][4096], procs_buf[MAX_PARENTS][4096 + 16], work[3][4096];
    char *procs[MAX_PARENTS];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) {
        for (int k = 0; k < nparents; k++) {
            snprintf(groups[k], sizeof groups[k], "%s/%d-%ld", argv[5 + k], (int)getpid(), i);
            snprintf(procs_buf[k], sizeof procs_buf[k], "%s/cgroup.procs", groups[k]);
            procs[k] = procs_buf[k];
            if (make_dir(groups[k], 0755) != 0) return 1;
        }
        const char *suffix[3] = {"", ".tmp", ".var-tmp"};
        for (int k = 0; k < 3; k++) {
            snprintf(work[k], sizeof work[k], "%s/%d-%ld%s", dirs, (int)getpid(), i, suffix[k]);
            if (make_dir(work[k], 0700) != 0 || chown(work[k], uid, gid) != 0) return 1;
        }
        pid_t pid = fork();
        if (pid < 0) {
            perror("design_floor: fork");
            return 1;
        }
        if (pid == 0) child(procs, nparents, work[1], work[2], work[0], uid, gid);
        int status;
        if (waitpid(pid, &status, 0) != pid) {
            perror("design_floor: waitpid");
            return 1;
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            int code = WIFEXITED(status) ? WEXITSTATUS(status) - 100 : -1;
            fprintf(stderr, "design_floor: the child failed at %s (status %d)\n",
                    code >= 0 && code <= ST_EXEC ? stage_names[code] : "?", status);
            return 1;
        }
        for (int k = 0; k < nparents; k++)
            if (remove_dir(groups[k]) != 0) return 1;
        for (int k = 0; k < 3; k++)
            if (remove_dir(work[k]) != 0) return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%.6f %ld\n", (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9, n);
    return 0;
}
