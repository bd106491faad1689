"""streammem.pipelines."""
