"""Developer tools: the kernels' ahead-of-time resource report and SASS gates (``python -m wpkl.tools.kernel_report``)."""
