"""Tools beside the server runtime: building the agent image, and the VDE boot lab.

    image.py       build the agent image (`bootserver image build`): the steps, in order
    apt.py         its Debian packages: chosen with apt-cache, fetched and cached as checked .debs
    contents.py    what it carries from them: kernel modules, programs and their shared libraries
    initramfs.py   the reproducible cpio it is written as, with /init and the agent's scripts (agent/)
    osimage.py     an installable Debian rootfs tarball (`bootserver image os debian`), with os_customize.sh
    lab.py         QEMU VMs on a VDE switch netbooting from bootserver (`bootserver lab`)
"""
