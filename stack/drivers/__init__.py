"""The PV drivers of the Xen Project Windows driver architecture, modelled on stack.kernel: xen (xen.sys),
xenfilt, xenbus and their interfaces, xenvif, xennet, xenvbd, xeniface."""
