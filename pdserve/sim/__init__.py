"""The trace-driven cluster simulator behind ``pdserve simulate``: workloads (``traces``), the
discrete-event cluster (``cluster``), and the capacity study and its report (``study``)."""
